"""`internvl-serve bench --quick` end to end: the tiny model through every scenario, baseline and stack.

No thresholds (the numbers are for people): the run must succeed, write the JSON, the markdown table and the plots,
and give every scenario numbers on both sides.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from procs import REPO

from tools.launcher import processes

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(600)]


def test_quick_run_writes_every_scenario(tiny_checkpoint, tmp_path):
    out = tmp_path / "results"
    # Scenarios 1-9 on the tiny checkpoint; the peer scenarios (10-14, vLLM beside the stack) have their own smoke
    # test, test_peer_quick.py.
    run = subprocess.run(
        [sys.executable, "-m", "tools.cli", "bench", "--quick", "--out", str(out), "--name", "smoke",
         "--model", str(tiny_checkpoint()), "--scenarios", "1,2,3,4,5,6,7,8,9"],
        check=False, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=540)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]

    doc = json.loads((out / "smoke.json").read_text())
    assert [s["number"] for s in doc["scenarios"]] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    for scenario in doc["scenarios"]:
        assert scenario["comparisons"], scenario["title"]
        for c in scenario["comparisons"]:
            where = f"scenario {scenario['number']}: {c['name']}"
            assert c["ours"]["n"] >= 1 and c["baseline"]["n"] >= 1, where
            # A rate may be 0 (round_robin can miss every later turn's prefix; no arrival may meet the SLO); times
            # and sizes may not.
            assert c["ours"]["median"] is not None, where
            assert c["ours"]["median"] > 0 or (c["ours"]["unit"] in ("%", "req/s") and c["ours"]["median"] == 0), \
                where
            assert c["baseline"]["median"] is not None and c["baseline"]["median"] > 0, where
            assert c["ratio_ours_over_baseline"] is not None, where
    # The scaled pool measured what it says: every session's three turns counted by the replicas, each configuration
    # starting with the embeddings cached (encoded once, then copied), on 1 and on 3 LLM replicas.
    pool = doc["scenarios"][7]["extra"]
    sessions = doc["config"]["workload"]["pool_sessions"]
    for config, replicas in (("1", 1), ("affinity", 3), ("round_robin", 3)):
        (per_replica,) = pool[f"s8.{config}.concurrent.sessions_per_replica"]
        assert len(per_replica) == replicas and sum(per_replica.values()) == sessions, config
        for name in ("sequential", "concurrent"):
            (usages,) = pool[f"s8.{config}.{name}.usage"]
            assert len(usages) == sessions and all(len(turns) == 3 for turns in usages), (config, name)
            assert all(turns[0]["encoded_tiles"] == 0 for turns in usages), (config, name)
    assert pool["s8.1.embeddings"] == ["encoded"] and pool["s8.round_robin.embeddings"] == ["copied"]
    assert pool["s8.round_robin.concurrent.routing_decisions"][0]["round_robin"] == 3 * sessions
    _check_arrivals(doc)
    machine = doc["machine"]
    for key in ("cpu_model", "logical_cpus", "torch", "dtype"):
        assert machine[key], key
    assert doc["config"]["quick"] is True and doc["config"]["repeats"] == 1

    table = (out / "smoke.md").read_text()
    for number in range(1, 10):
        assert f"\n| {number} | " in table, number
    assert "**Scenario 9, per rate and system" in table
    assert table.count("\n| windowed batch_chat | ") == len(doc["config"]["workload"]["arrival_loads"])
    assert machine["cpu_model"] in table and machine["torch"] in table
    for name in ("smoke-overview.png", "smoke-scenarios.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in table


def _check_arrivals(doc: dict) -> None:
    """Scenario 9 served every request of every rate on all three systems, each timed from its arrival."""
    w = doc["config"]["workload"]
    (arrivals,) = [s for s in doc["scenarios"] if s["number"] == 9]
    cal = arrivals["extra"]["calibration"]
    assert len(cal["rates_rps"]) == len(w["arrival_loads"]) == 2 and cal["rates_rps"][0] < cal["rates_rps"][1]
    assert cal["slo_ttft_s"] > 0 and cal["slo_tpot_s"] > 0 and cal["window_s"] > 0
    targets = [c for c in arrivals["comparisons"] if c["target"]]
    assert [c["name"] for c in targets] == ["0.9x load: p50 TTFT vs windowed batch_chat",
                                            "0.9x load: output tokens/s vs windowed batch_chat"]
    for system in ("stack", "chat", "batch"):
        for load in w["arrival_loads"]:
            (run,) = doc["extra"][f"s9.runs.{system}.load{load:g}"]
            served = run["served"]
            assert len(served) == w["arrival_requests"], (system, load)
            assert [r["index"] for r in sorted(served, key=lambda r: r["index"])] == list(range(len(served)))
            for r in served:
                times = r["token_times"]
                assert 1 <= len(times) <= r["max_new_tokens"], (system, load, r)
                assert times[0] >= r["arrival"] and times == sorted(times), (system, load, r)
            if system != "stack":
                assert all(r["start"] >= r["arrival"] for r in served)
            else:
                # Every image was new to the stack's cache.
                assert run["reused_tiles"] == 0 and run["encoded_tiles"] == run["images"]


def _bench_processes(model: str) -> list[int]:
    """Processes of this benchmark's stack: `up` and the services it started, all given `--model <model>`."""
    return [p.pid for p in processes() if "tools.cli" in p.argv and model in p.argv and "bench" not in p.argv]


def test_sigterm_keeps_finished_phases_and_resume_completes_the_run(tiny_checkpoint, tmp_path):
    """SIGTERM in the second repeat (baseline loaded, stack up) stops the stack under test; `--resume` runs only the
    phases left, the second repeat again with a new stack and baseline."""
    import signal
    import time

    model = str(tiny_checkpoint())
    out = tmp_path / "results"
    # Scenarios 1-7 only: the scaled pool's phase and the arrivals are covered by the test above and would add a
    # minute here.
    argv = [sys.executable, "-m", "tools.cli", "bench", "--quick", "--out", str(out), "--name", "cut",
            "--model", model, "--scenarios", "1,2,3,4,5,6,7", "--repeats", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    partial = out / "cut.json.tmp"
    first = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        # Stop it once the first repeat is saved (its stack stays up for the second).
        if partial.exists() and "repeat-1" in json.loads(partial.read_text())["extra"]["phases_done"] \
                and _bench_processes(model):
            break
        time.sleep(0.2)
    assert first.poll() is None, "the run ended before it could be interrupted"
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) != 0
    saved = json.loads(partial.read_text())
    assert saved["extra"]["phases_done"] == ["limits", "repeat-1"]
    deadline = time.monotonic() + 30
    while _bench_processes(model) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _bench_processes(model), "the interrupted benchmark left its stack running"

    resumed = subprocess.run([*argv, "--resume"], check=False, cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=540)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert not partial.exists()
    doc = json.loads((out / "cut.json").read_text())
    assert doc["extra"]["resumed"] is True
    assert doc["extra"]["phases_done"] == ["limits", "repeat-1", "repeat-2", "stack-2", "limits-end"]
    assert [s["number"] for s in doc["scenarios"]] == [1, 2, 3, 4, 5, 6, 7]
    # The first repeat ran once: its measures were restored, not measured again; the second was measured anew.
    assert doc["extra"]["phase_seconds"]["repeat-1"] == saved["extra"]["phase_seconds"]["repeat-1"]
    by_name = {c["name"]: c for s in doc["scenarios"] for c in s["comparisons"]}
    for c in by_name.values():
        # One sample per repeat on both sides of every per-repeat measure (the memory and the floors are single).
        assert c["ours"]["n"] >= 1 and c["baseline"]["n"] >= 1, c["name"]
        if c["competitive"] and c["ours"]["unit"] != "MiB":
            assert c["ours"]["n"] == 2 and c["baseline"]["n"] == 2, c["name"]
