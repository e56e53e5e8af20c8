"""Scenario 9's arithmetic against hand-computed values: percentiles, TTFT/TPOT/ITL, throughput and goodput, the
batching window, chat()'s estimated service time, and the seeded arrivals."""

from __future__ import annotations

import itertools
import math

import pytest

from bench import workload as W
from bench.arrivals import (
    Served,
    Slo,
    delta_token_times,
    mean_service_s,
    percentile,
    run_stats,
    window_batch,
)


def test_percentile_is_linear_between_order_statistics():
    assert percentile([4, 1, 3, 2], 50) == pytest.approx(2.5)
    assert percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)  # position 3 x 0.99 = 2.97: 3 + 0.97 x (4 - 3)
    assert percentile([10, 0, 20], 25) == pytest.approx(5.0)
    assert percentile([5.0], 99) == 5.0
    assert percentile([1.0, math.nan, 3.0], 50) == pytest.approx(2.0)
    assert math.isnan(percentile([], 50))


def _three_requests() -> list[Served]:
    return [
        # TTFT 1.0, TPOT (2.0 - 1.0) / 2 = 0.5, gaps 0.5 0.5
        Served(0, "text-only", 3, arrival=0.0, token_times=[1.0, 1.5, 2.0]),
        # TTFT 2.5, TPOT (4.0 - 3.0) / 3, gaps 0.2 0.2 0.6
        Served(1, "one image", 4, arrival=0.5, token_times=[3.0, 3.2, 3.4, 4.0]),
        # one token: TTFT 0.5, no TPOT, no gap
        Served(2, "two images", 1, arrival=1.0, token_times=[1.5]),
    ]


def test_request_ttft_tpot_and_gaps():
    a, b, c = _three_requests()
    assert (a.ttft, a.tpot, a.gaps()) == (1.0, 0.5, [0.5, 0.5])
    assert b.ttft == 2.5 and b.tpot == pytest.approx(1 / 3)
    assert b.gaps() == pytest.approx([0.2, 0.2, 0.6])
    assert c.ttft == 0.5 and math.isnan(c.tpot) and c.gaps() == []


def test_run_stats_by_hand():
    stats = run_stats(_three_requests(), Slo(ttft_s=2.0, tpot_s=0.45))
    # TTFTs 0.5, 1.0, 2.5: p99 at position 1.98 = 1.0 + 0.98 x 1.5
    assert stats["ttft_p50"] == pytest.approx(1.0)
    assert stats["ttft_p99"] == pytest.approx(2.47)
    # TPOTs 1/3 and 0.5 (the one-token answer has none)
    assert stats["tpot_p50"] == pytest.approx((1 / 3 + 0.5) / 2)
    assert stats["tpot_p99"] == pytest.approx(1 / 3 + 0.99 * (0.5 - 1 / 3))
    # ITLs pooled: 0.2 0.2 0.5 0.5 0.6
    assert stats["itl_p50"] == pytest.approx(0.5)
    assert stats["itl_p99"] == pytest.approx(0.596)
    # 8 tokens over the span from the first arrival (0) to the last token (4.0)
    assert stats["span_s"] == pytest.approx(4.0) and stats["tokens"] == 8
    assert stats["throughput"] == pytest.approx(2.0)
    # Within the SLO: only the one-token answer (the first is too slow per token, the second too late to start)
    assert stats["goodput"] == pytest.approx(1 / 4.0)
    assert stats["within_slo"] == pytest.approx(100 / 3)


def test_slo_needs_a_first_token():
    slo = Slo(ttft_s=10.0, tpot_s=10.0)
    assert not slo.met(Served(0, "text-only", 4, arrival=0.0))
    assert slo.met(Served(0, "text-only", 4, arrival=0.0, token_times=[1.0, 2.0]))
    assert math.isnan(run_stats([Served(0, "text-only", 4, arrival=0.0)], slo)["throughput"])


def test_batching_window():
    arrivals = [0.0, 0.1, 0.2, 1.0, 1.05, 5.0]
    # Idle worker: the window would end at 0.3, but the batch of 3 is full at 0.2.
    assert window_batch(arrivals, 0, 0.0, 0.3, 3) == (0.2, 3)
    # Free at 0.9, before request 3's window ends (1.3): waits for it, and takes request 4 too.
    assert window_batch(arrivals, 3, 0.9, 0.3, 3) == (1.3, 5)
    # Busy until 2.0: starts at once with everything that arrived meanwhile.
    assert window_batch(arrivals, 3, 2.0, 0.3, 3) == (2.0, 5)
    # A batch never holds more than max_batch, however many wait.
    assert window_batch(arrivals, 0, 3.0, 0.3, 3) == (3.0, 3)
    # The last request alone: its whole window.
    assert window_batch(arrivals, 5, 2.0, 0.3, 3) == (5.3, 6)
    # Window 0, batch 1: first come, first served by one worker.
    assert window_batch(arrivals, 1, 0.05, 0.0, 1) == (0.1, 2)
    assert window_batch(arrivals, 1, 0.5, 0.0, 1) == (0.5, 2)


def test_mean_service_time_of_the_mix():
    kinds = {"text-only": {"ttft_s": 0.2, "step_s": 0.1}, "one image": {"ttft_s": 1.0, "step_s": 0.1},
             "two images": {"ttft_s": 2.0, "step_s": 0.12}}
    # 0.5 x (0.2 + 10 x 0.1) + 0.3 x (1.0 + 10 x 0.1) + 0.2 x (2.0 + 10 x 0.12)
    assert mean_service_s(kinds, (0.5, 0.3, 0.2), 11) == pytest.approx(1.84)
    assert mean_service_s(kinds, (5, 3, 2), 11) == pytest.approx(1.84)


def test_delta_token_times():
    assert delta_token_times([(10.5, 1), (11.0, 2)], 10.0) == [0.5, 1.0, 1.0]


def test_arrivals_are_seeded_and_scale_with_the_rate():
    slow = W.arrival_requests(0, 0, 12, 0.5, (0.5, 0.3, 0.2), (8, 12, 16), 32)
    fast = W.arrival_requests(0, 1, 12, 2.0, (0.5, 0.3, 0.2), (8, 12, 16), 32)
    again = W.arrival_requests(0, 0, 12, 0.5, (0.5, 0.3, 0.2), (8, 12, 16), 32)
    assert slow == again
    assert slow[0].arrival_s == 0.0
    assert all(a.arrival_s < b.arrival_s for a, b in itertools.pairwise(slow))
    # Every rate of a repeat: the same kinds and lengths, gaps scaled by 1 / rate, new images and questions.
    assert [r.kind for r in slow] == [r.kind for r in fast]
    assert [r.max_new_tokens for r in slow] == [r.max_new_tokens for r in fast]
    assert [4 * r.arrival_s for r in fast] == pytest.approx([r.arrival_s for r in slow])
    images = [data for r in [*slow, *fast] for data in r.images]
    assert images and len(set(images)) == len(images)
    assert len({r.question for r in [*slow, *fast]}) == 24
    assert {r.max_new_tokens for r in slow} <= {8, 12, 16}
    # Another repeat: other times and images.
    other = W.arrival_requests(1, 0, 12, 0.5, (0.5, 0.3, 0.2), (8, 12, 16), 32)
    assert [r.arrival_s for r in other] != [r.arrival_s for r in slow]
    with pytest.raises(ValueError):
        W.arrival_requests(0, 1, 300, 1.0, (1, 1, 1), (8,), 32)


def test_calibration_requests_are_one_of_each_kind():
    reqs = W.calibration_requests((8, 12, 16), 32)
    assert [r.kind for r in reqs] == list(W.ARRIVAL_KINDS)
    assert all(r.max_new_tokens == 16 for r in reqs)


def test_scenario_9_targets_and_table():
    """The issue's targets at the higher rate (stack p50 TTFT <= 0.5x windowed batch_chat's, tokens/s >= 1.0x), read
    from recorded measures; the percentiles table has a row per system and rate."""
    import argparse

    from bench import report, scenarios
    from bench.arrivals import METRICS, measure_key
    from bench.phases import Recorder
    from bench.settings import BenchSettings

    s = BenchSettings.from_args(argparse.Namespace(quick=True, repeats=None, dtype="float32", model=None,
                                                   checkpoint_dir=None, out="o", name=None, scenarios=frozenset({9})))
    rec = Recorder()
    rec.extra["s9.calibration"] = {"loads": [0.5, 0.9], "rates_rps": [1.0, 1.8], "mean_service_s": 0.5,
                                   "window_s": 0.25, "slo_ttft_s": 3.0, "slo_tpot_s": 0.3, "kinds": {}}
    values = {"stack": {"ttft_p50": 0.4, "throughput": 30.0}, "batch": {"ttft_p50": 1.0, "throughput": 29.0},
              "chat": {"ttft_p50": 2.0, "throughput": 20.0}}
    for system, figures in values.items():
        for load in (0.5, 0.9):
            for metric, (label, unit) in METRICS.items():
                rec.add(measure_key(system, load, metric), label, unit, figures.get(metric, 1.0))
            worker = {} if system == "stack" else {"busy_fraction": 0.5, "mean_batch": 2.0}
            rec.note(f"s9.runs.{system}.load{load:g}", {"requests": 8, "requests_at_max_new_tokens": 7, **worker})
    (built,) = scenarios.build(s, rec, None)
    assert built.number == 9 and built.has_numbers()
    by_name = {c.name: c.to_dict() for c in built.comparisons}
    ttft = by_name["0.9x load: p50 TTFT vs windowed batch_chat"]
    assert ttft["ratio_ours_over_baseline"] == pytest.approx(0.4) and ttft["met"] is True
    tokens = by_name["0.9x load: output tokens/s vs windowed batch_chat"]
    assert tokens["ratio_ours_over_baseline"] == pytest.approx(30 / 29) and tokens["met"] is True
    assert by_name["0.5x load: p50 TTFT vs windowed batch_chat"]["target"] is None
    assert by_name["0.9x load: goodput vs the offered rate"]["baseline"]["median"] == 1.8
    (table,) = built.extra["tables"]
    lines = report._table(table)
    assert len(lines) == 2 + 6
    assert lines[2].startswith("| stack | 0.5x | 1 req/s | 400.0 ms |") and lines[2].endswith("| n/a | n/a | 7/8 |")
    assert lines[4].startswith("| windowed batch_chat | 0.5x |") and lines[4].endswith("| 50 % | 2 | 7/8 |")
    assert "0.5x and 0.9x the sequential chat() capacity: 1.000 and 1.800 requests/s" in built.setup
