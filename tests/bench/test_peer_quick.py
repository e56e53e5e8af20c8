"""`internvl-serve bench --quick --scenarios 10,11,12,13,14` end to end: `vllm serve` beside our stack on both
engines, on the small checkpoint (vLLM's CPU attention needs a head size of at least 32).

No thresholds (the numbers are for people): the run must succeed, check `vllm serve`'s prompt ids against ours
before timing it, give every peer scenario numbers on every side, and measure what each scenario says it measures
(the round-robin proxy moves every turn to another replica; our sessions find their prefix).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from procs import REPO

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    from services.model.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt-small"), preset="small")


def test_quick_peer_run(small_checkpoint, tmp_path):
    out = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, "-m", "tools.cli", "bench", "--quick", "--out", str(out), "--name", "peer",
         "--model", str(small_checkpoint), "--scenarios", "10,11,12,13,14"],
        check=False, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=2300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]

    doc = json.loads((out / "peer.json").read_text())
    extra = doc["extra"]
    assert [s["number"] for s in doc["scenarios"]] == [10, 11, 12, 13, 14]
    # vllm serve's prompt ids were compared with ours (the run stops on a difference) before anything was timed.
    assert extra["peer.prompt_check"]["image"] > extra["peer.prompt_check"]["text"] > 0
    for scenario in doc["scenarios"]:
        for c in scenario["comparisons"]:
            where = f"scenario {scenario['number']}: {c['name']}"
            assert c["ours"]["n"] >= 1 and c["baseline"]["n"] >= 1, where
            assert c["ratio_ours_over_baseline"] is not None, where
    w = doc["config"]["workload"]

    # 10: every side answered every request of every rate, each answer's tokens timed from its arrival.
    for side in ("vllm", "ours-vllm", "ours-transformers"):
        for load in w["peer_arrival_loads"]:
            (run_,) = extra[f"s10.runs.{side}.load{load:g}"]
            assert len(run_["served"]) == w["peer_arrival_requests"], (side, load)
            for r in run_["served"]:
                assert 1 <= len(r["token_times"]) <= r["max_new_tokens"] and r["token_times"][0] >= r["arrival"]

    # 13: behind round robin each turn of a vllm serve conversation went to the next replica and found no prefix
    # there; our sessions on three replicas found theirs.
    for replicas in extra["s13.vllm.history.replicas"]:
        assert len(set(replicas)) == 3
    for turns in extra["s13.vllm.history.usage"]:
        assert [t["cached_prompt_tokens"] for t in turns[1:]] == [0, 0]
    for turns in extra["s13.ours-vllm.session.usage"] + extra["s11.ours-vllm.session.usage"]:
        assert all(t["cached_prompt_tokens"] > 0 for t in turns[1:]), turns

    # 12: on three replicas the image's returns went to other vllm serve replicas than its first conversation.
    (served,) = extra["s12.vllm.3.replica"]
    assert len({served["first"], served["system"], served["question"]}) == 3

    sides = extra["peer.sides"]
    assert {s["label"] for s in sides} == {"vllm serve", "ours (vLLM engine)", "ours (transformers engine)"}
    table = (out / "peer.md").read_text()
    assert "**Scenario 10, per rate and side" in table
    for number in range(10, 15):
        assert f"\n| {number} | " in table, number
