"""The benchmark's arithmetic: statistics, ratios and targets, the analytic floors, the dtype choice."""

from __future__ import annotations

import math

import pytest

from bench import machine
from bench.phases import Recorder, _union_length
from bench.results import Comparison, Measure, Target
from services.model.spec import ModelSpec
from services.model.tiny import PRESETS, chat_config


def test_measure_summary():
    m = Measure("x", "s", [3.0, 1.0, 2.0])
    s = m.summary()
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    assert s["stdev"] == pytest.approx(1.0)
    assert math.isnan(Measure("empty", "s").median)


@pytest.mark.parametrize(("ours", "base", "higher", "target", "ratio", "better", "met"), [
    # latency: a hit 200x faster than a miss meets ">= 100x faster" (ratio <= 0.01)
    ([0.01], [2.0], False, Target(">= 100x", max_ratio=0.01), 0.005, 200.0, True),
    ([0.1], [2.0], False, Target(">= 100x", max_ratio=0.01), 0.05, 20.0, False),
    # throughput: 3x the baseline meets ">= 3x"
    ([30.0], [10.0], True, Target(">= 3x", min_ratio=3.0), 3.0, 3.0, True),
    ([20.0], [10.0], True, Target(">= 3x", min_ratio=3.0), 2.0, 2.0, False),
    # overhead: 1.05x of the reference meets "<= 1.10x"
    ([1.05], [1.0], False, Target("<= 1.10x", max_ratio=1.10), 1.05, 1 / 1.05, True),
    ([1.0], [1.0], False, None, 1.0, 1.0, None),
])
def test_comparison_ratio_and_target(ours, base, higher, target, ratio, better, met):
    c = Comparison("c", Measure("o", "s", ours), Measure("b", "s", base), higher_is_better=higher, target=target)
    assert c.ratio == pytest.approx(ratio)
    assert c.better_by == pytest.approx(better)
    assert c.to_dict()["met"] is met


def test_comparison_without_samples_has_no_ratio():
    c = Comparison("c", Measure("o", "s"), Measure("b", "s", [1.0]), target=Target("t", max_ratio=1.0))
    assert math.isnan(c.ratio) and c.to_dict()["met"] is None


def test_vision_flops_of_internvit_300m_tile():
    """InternViT-300M at 448 px: 1025 tokens x 24 layers of width 1024 (MLP 4096), about 0.73 TFLOP per tile."""
    spec = ModelSpec.from_config(chat_config(PRESETS["1b-shape"], "qwen2", "300m"))
    flops = machine.vision_flops_per_tile(spec)
    n, d = 1025, 1024
    layers = 24 * (2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 4 * n * d * 4096)
    projector = 2 * 256 * (4096 * 896 + 896 * 896)
    assert flops == layers + 2 * 1024 * 588 * 1024 + projector
    assert 0.70e12 < flops < 0.75e12


def test_dtype_choice(monkeypatch):
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx2", "fma"})
    assert machine.choose_dtype(None, "cpu")[0] == "float32"
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert machine.choose_dtype(None, "cpu")[0] == "bfloat16"
    assert machine.choose_dtype(None, "cuda")[0] == "bfloat16"
    assert machine.choose_dtype("float16", "cpu")[0] == "float16"


def test_union_length():
    assert _union_length([(0, 2), (1, 3), (5, 6)]) == 4
    assert _union_length([(0, 10), (2, 3)]) == 10
    assert _union_length([]) == 0


def test_recorder_survives_a_save_and_restore(tmp_path):
    """`--resume` continues from this file: every sample and note must come back as it was recorded."""
    rec = Recorder()
    rec.add("s1.miss", "Encode, cache miss", "s", 2.5)
    rec.add("s1.miss", "Encode, cache miss", "s", 2.7)
    rec.note("s1.tiles", 5)
    rec.extra["phases_done"] = ["limits", "baseline"]
    path = tmp_path / "run.json.tmp"
    rec.save(path)
    back = Recorder.restore(path)
    assert back.measures["s1.miss"].samples == [2.5, 2.7]
    assert (back.measures["s1.miss"].label, back.measures["s1.miss"].unit) == ("Encode, cache miss", "s")
    assert back.extra == {"s1.tiles": [5], "phases_done": ["limits", "baseline"]}
    assert not path.with_name(path.name + ".part").exists()


def test_profile_summary_counts_computing_samples_by_innermost_frame():
    import collections

    from bench.profile import summarise

    stacks = collections.Counter({
        "main (a/up.py:1);forward (x/modeling_qwen2.py:10);linear (y/functional.py:5)": 6,
        "main (a/up.py:1);forward (x/modeling_qwen2.py:12)": 2,
        "main (a/up.py:1);EpollSelector.select (z/selectors.py:468)": 10,  # idle: not counted as computing
        "Thread._bootstrap (threading.py:1002);Thread.run (threading.py:982)": 2,  # a C extension's thread, waiting
    })
    text = summarise("t", stacks)
    assert "20 samples of all threads at 50 Hz, 8 of them computing" in text
    assert " 75.0%  linear (functional.py:5)" in text
    assert " 25.0%  forward (modeling_qwen2.py:12)" in text
    assert "selectors" not in text and "Thread.run" not in text


def test_prefix_hit_needs_the_whole_previous_prompt_cached():
    from bench.pool import prefix_hits

    turns = [{"prompt_tokens": 1334, "cached_prompt_tokens": 41},
             {"prompt_tokens": 1351, "cached_prompt_tokens": 1335},  # hit: covers turn 1's 1334
             {"prompt_tokens": 1370, "cached_prompt_tokens": 1334}]  # miss: turn 2's 1351 not all cached
    assert prefix_hits(turns) == (1, 2)
    assert prefix_hits(turns[:1]) == (0, 0)


def test_balance_bound_is_the_load_bound_plus_one_session():
    from bench.pool import balance_bound

    assert balance_bound(6, 3, 0.25) == pytest.approx(3.5)
    assert balance_bound(3, 3, 0.0) == pytest.approx(2.0)


def test_every_scenario_has_a_phase_and_a_selection_skips_the_rest():
    import argparse

    from bench.main import PHASE_SCENARIOS, _scenario_list
    from bench.settings import SCENARIOS, BenchSettings

    assert set().union(*PHASE_SCENARIOS.values()) == set(SCENARIOS)
    assert _scenario_list("8") == {8} and _scenario_list("1, 2,") == {1, 2}
    with pytest.raises(argparse.ArgumentTypeError):
        _scenario_list("eight")
    assert [name for name, wanted in PHASE_SCENARIOS.items() if 8 in wanted] == \
        ["stack-1", "stack-2", "stack-round-robin"]
    # The arrivals run in the repeats only (baseline and stack interleaved), so `--scenarios 9` needs nothing else.
    assert [name for name, wanted in PHASE_SCENARIOS.items() if 9 in wanted] == ["repeat"]
    args = argparse.Namespace(quick=True, repeats=None, dtype="float32", model=None, checkpoint_dir=None, out="o",
                              name=None, scenarios=frozenset({max(SCENARIOS) + 1}))
    with pytest.raises(Exception, match=rf"no scenario \[{max(SCENARIOS) + 1}\]"):
        BenchSettings.from_args(args)
