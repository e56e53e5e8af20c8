"""The peer scenarios' comparisons and targets, read from recorded measures with hand-picked values: which side is
ours and which the baseline, the direction of each target, and scenario 10's table."""

from __future__ import annotations

import argparse

import pytest

from bench import report
from bench.arrivals import METRICS
from bench.peer import scenarios
from bench.peer.arrivals import CALIBRATION, measure_key
from bench.phases import Recorder
from bench.settings import PEER_SCENARIOS, BenchSettings


def _settings() -> BenchSettings:
    return BenchSettings.from_args(argparse.Namespace(
        quick=True, repeats=None, dtype="float32", model=None, checkpoint_dir=None, out="o", name=None,
        scenarios=frozenset(PEER_SCENARIOS)))


def _recorder() -> Recorder:
    rec = Recorder()
    rec.extra[CALIBRATION] = {"loads": [0.5, 0.9], "rates_rps": [1.0, 1.8], "mean_service_s": 0.5,
                              "slo_ttft_s": 3.0, "slo_tpot_s": 0.3, "kinds": {}}
    arrivals = {"vllm": {"ttft_p50": 1.0, "throughput": 20.0}, "ours-vllm": {"ttft_p50": 1.2, "throughput": 19.0},
                "ours-transformers": {"ttft_p50": 2.0, "throughput": 10.0}}
    for side, figures in arrivals.items():
        for load in (0.5, 0.9):
            for metric, (label, unit) in METRICS.items():
                rec.add(measure_key(side, load, metric), label, unit, figures.get(metric, 1.0))
            rec.note(f"s10.runs.{side}.load{load:g}", {"requests": 6, "requests_at_max_new_tokens": 5})
    for number, ours in ((11, 0.5), (13, 0.1)):
        for turn in (1, 2, 3):
            rec.add(f"s{number}.vllm.history.turn{turn}", "a", "s", 1.0)
            rec.add(f"s{number}.ours-vllm.session.turn{turn}", "b", "s", ours)
            rec.add(f"s{number}.ours-vllm.history.turn{turn}", "b", "s", 0.8)
            rec.add(f"s{number}.ours-transformers.session.turn{turn}", "c", "s", 0.9)
    for where in ("1", "3"):
        for variant, (a, b) in {"first": (8.0, 6.0), "system": (8.0, 0.5), "question": (8.0, 1.0)}.items():
            rec.add(f"s12.vllm.{where}.{variant}", "a", "s", a)
            rec.add(f"s12.ours-vllm.{where}.{variant}", "b", "s", b)
    for side, (tokens, decode) in {"vllm": (40.0, 50.0), "ours-vllm": (30.0, 45.0),
                                   "ours-transformers": (20.0, 25.0)}.items():
        rec.add(f"s14.{side}.tokens_per_s", side, "tok/s", tokens)
        rec.add(f"s14.{side}.decode_per_s", side, "tok/s", decode)
    return rec


@pytest.fixture(scope="module")
def built():
    return {s.number: s for s in scenarios.build(_settings(), _recorder())}


def _by_name(scenario) -> dict[str, dict]:
    return {c.name: c.to_dict() for c in scenario.comparisons}


def test_every_peer_scenario_has_numbers(built):
    assert sorted(built) == list(PEER_SCENARIOS)
    assert all(s.has_numbers() for s in built.values())


def test_arrivals_targets_at_each_rate(built):
    c = _by_name(built[10])
    for load in ("0.5x", "0.9x"):
        ttft = c[f"{load}: p50 TTFT, ours (vLLM engine) vs vllm serve"]
        assert ttft["ratio_ours_over_baseline"] == pytest.approx(1.2) and ttft["met"] is False  # <= 1.1x asked
        tokens = c[f"{load}: output tokens/s, ours (vLLM engine) vs vllm serve"]
        assert tokens["ratio_ours_over_baseline"] == pytest.approx(0.95) and tokens["met"] is True  # >= 0.9x
        assert c[f"{load}: p50 TTFT, ours (transformers engine) vs vllm serve"]["target"] is None
    (table,) = built[10].extra["tables"]
    lines = report._table(table)
    assert len(lines) == 2 + 6
    assert lines[2].startswith("| vllm serve | 0.5x | 1 req/s | 1.00 s |") and lines[2].endswith("| 5/6 |")


def test_conversation_targets(built):
    one, three = _by_name(built[11]), _by_name(built[13])
    # One replica: 0.5 s against 1.0 s is 2x better, the 1.5x asked for; three replicas: 0.1 s is 10x, 5x asked.
    session = one["turn 2 TTFT: ours (vLLM engine, session) vs vllm serve"]
    assert session["better_by"] == pytest.approx(2.0) and session["met"] is True
    assert session["target"]["max_ratio"] == pytest.approx(1 / 1.5)
    pooled = three["turn 3 TTFT: ours (vLLM engine, session) vs vllm serve"]
    assert pooled["better_by"] == pytest.approx(10.0) and pooled["met"] is True
    assert pooled["target"]["max_ratio"] == pytest.approx(0.2)
    assert one["turn 2 TTFT: ours (vLLM engine, resent history) vs vllm serve"]["target"] is None
    assert "turn 2 TTFT: ours (transformers engine, session) vs vllm serve" in one
    assert "turn 2 TTFT: ours (transformers engine, session) vs vllm serve" not in three


def test_returning_image_targets(built):
    c = _by_name(built[12])
    # 8 s against 0.5 s is 16x (met); against 1.0 s, 8x (missed: 10x asked).
    for where in ("one replica", "another replica"):
        system = c[f"{where}, another system prompt: TTFT, ours (vLLM engine) vs vllm serve"]
        question = c[f"{where}, a question before it: TTFT, ours (vLLM engine) vs vllm serve"]
        assert system["better_by"] == pytest.approx(16.0) and system["met"] is True
        assert question["better_by"] == pytest.approx(8.0) and question["met"] is False
        assert c[f"{where}: the image's first conversation TTFT (for reference)"]["target"] is None


def test_decode_target_is_our_two_engines(built):
    c = _by_name(built[14])
    engines = c["decode-phase tokens/s: ours, vLLM engine vs transformers engine"]
    assert engines["ratio_ours_over_baseline"] == pytest.approx(45 / 25) and engines["met"] is True
    assert engines["baseline"]["label"] == "ours-transformers"
    assert c["decode-phase tokens/s: ours (vLLM engine) vs vllm serve"]["better_by"] == pytest.approx(0.9)
