"""Scenarios 10-14 as comparisons: ours against `vllm serve` (the baseline column), and our vLLM engine against our
transformers engine for decode. Ratios are ours / baseline of the medians, as in the main benchmark.

Targets (ours on the vLLM engine, b, against `vllm serve`, a): the same image in a new conversation >= 10x better
TTFT (one replica and another replica); turn-2/3 TTFT >= 5x better at three replicas and >= 1.5x at one; arrivals
with nothing reused, throughput >= 0.9x and p50 TTFT <= 1.1x at each rate. b against c: 8-stream decode throughput
>= 1.5x. Our transformers engine (c) is shown beside `vllm serve` for reference, without targets.
"""

from __future__ import annotations

import math

from bench.arrivals import METRICS
from bench.peer.arrivals import CALIBRATION, load_key, measure_key
from bench.peer.sides import LABELS
from bench.phases import Recorder
from bench.results import Comparison, Measure, Scenario, Target
from bench.settings import BenchSettings

TABLE_METRICS = ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "itl_p50", "itl_p99", "throughput", "goodput",
                 "within_slo")
SIDES = tuple(LABELS)


def _m(rec: Recorder, key: str) -> Measure:
    return rec.measures.get(key) or Measure(key, "")


def _better_by(factor: float) -> Target:
    return Target(f">= {factor:g}x better", max_ratio=1 / factor)


def build(s: BenchSettings, rec: Recorder) -> list[Scenario]:
    out = [_arrivals(s, rec), _conversations(s, rec, 11, "one replica", 1.5, ("ours-transformers", "session")),
           _returning(s, rec), _conversations(s, rec, 13, f"{s.workload.peer_replicas} replicas", 5.0, None),
           _decode(s, rec)]
    return [scenario for scenario in out if scenario.number in s.scenarios]


def _setup_common(s: BenchSettings) -> str:
    return ("vllm serve (prefix caching on, the benchmark's chat template, images as data URLs) vs ours (`up --engine "
            "vllm`; `--engine transformers`) through the gateway's OpenAI API; "
            f"{s.workload.peer_kv_mib} MiB of KV pool per vLLM replica" + (", eager" if s.device == "cpu" else "")
            + "; greedy, streamed, logprobs on (one entry per token: exact token times)")


def _arrivals(s: BenchSettings, rec: Recorder) -> Scenario:
    w = s.workload
    cal = rec.extra.get(CALIBRATION) or {}
    loads = list(cal.get("loads") or w.peer_arrival_loads)
    rates = cal.get("rates_rps") or [math.nan] * len(loads)
    scenario = Scenario(10, "Peer: arrivals, nothing reused", (
        f"{_setup_common(s)}. Scenario 9's request mix (text, one or two fresh {w.arrival_image_side}x"
        f"{w.arrival_image_side} images, max_new_tokens over {', '.join(map(str, w.arrival_new_tokens))}), "
        f"{w.peer_arrival_requests} Poisson arrivals per rate at {' and '.join(f'{x:g}x' for x in loads)} vllm "
        f"serve's capacity ({' and '.join(f'{x:.3f}' for x in rates)} req/s; capacity 1 / its mean service time "
        f"{cal.get('mean_service_s', math.nan):.2f} s from {w.arrival_calibration_runs} unloaded requests of each "
        f"kind); SLO TTFT <= {cal.get('slo_ttft_s', math.nan):.2f} s and TPOT <= "
        f"{1e3 * cal.get('slo_tpot_s', math.nan):.0f} ms ({w.arrival_slo_ttft:g}x and {w.arrival_slo_tpot:g}x vllm "
        "serve's unloaded two-image request); every side gets the same requests at the same times"))
    for load, rate in zip(loads, rates, strict=True):
        def m(side: str, metric: str, load: float = load) -> Measure:
            return _m(rec, measure_key(side, load, metric))

        scenario.comparisons += [
            Comparison(f"{load:g}x: p50 TTFT, ours (vLLM engine) vs vllm serve", m("ours-vllm", "ttft_p50"),
                       m("vllm", "ttft_p50"), target=Target("<= 1.1x", max_ratio=1.1)),
            Comparison(f"{load:g}x: output tokens/s, ours (vLLM engine) vs vllm serve", m("ours-vllm", "throughput"),
                       m("vllm", "throughput"), higher_is_better=True, target=Target(">= 0.9x", min_ratio=0.9)),
            Comparison(f"{load:g}x: p50 TTFT, ours (transformers engine) vs vllm serve",
                       m("ours-transformers", "ttft_p50"), m("vllm", "ttft_p50")),
            Comparison(f"{load:g}x: output tokens/s, ours (transformers engine) vs vllm serve",
                       m("ours-transformers", "throughput"), m("vllm", "throughput"), higher_is_better=True),
            Comparison(f"{load:g}x: goodput, ours (vLLM engine) vs vllm serve", m("ours-vllm", "goodput"),
                       m("vllm", "goodput"), higher_is_better=True),
        ]
    rows = []
    for load, rate in zip(loads, rates, strict=True):
        for side in SIDES:
            runs = rec.extra.get(f"s10.runs.{side}.{load_key(load)}", [])
            full = f"{sum(x['requests_at_max_new_tokens'] for x in runs)}/{sum(x['requests'] for x in runs)}"
            rows.append([LABELS[side], f"{load:g}x", rate,
                         *(_m(rec, measure_key(side, load, k)).median for k in TABLE_METRICS), full])
    scenario.extra = {"calibration": cal, "tables": [{
        "title": "Scenario 10, per rate and side (medians over the repeats that measured it)",
        "columns": ["side", "load", "rate", *(METRICS[k][0] for k in TABLE_METRICS), "answers of max_new_tokens"],
        "units": ["", "", "req/s", *(METRICS[k][1] for k in TABLE_METRICS), ""], "rows": rows}],
        "runs": {k: [{key: v for key, v in run.items() if key != "served"} for run in runs]
                 for k, runs in rec.extra.items() if k.startswith("s10.runs.")}}
    return scenario


def _conversations(s: BenchSettings, rec: Recorder, number: int, where: str, factor: float,
                   extra_side: tuple[str, str] | None) -> Scenario:
    w = s.workload
    sessions = w.peer_sessions if number == 11 else w.peer_pool_sessions
    balancing = ("vllm serve replicas behind a round-robin proxy (each turn lands on the next replica), ours with "
                 "affinity routing" if number == 13 else "one replica each")
    scenario = Scenario(number, f"Peer: 3-turn conversations, {where}", (
        f"{_setup_common(s)}. {sessions} conversation(s) per repeat, one at a time, each about its own "
        f"{w.peer_image_side}x{w.peer_image_side} image (5 tiles), {w.peer_turn_tokens} tokens per turn; "
        f"{balancing}; vllm serve gets the stateless OpenAI history every turn (the image resent as its data URL), "
        "ours either continues its session (session_id; the next turn sends only its question) or gets the same "
        "stateless history"))

    def m(side: str, mode: str, turn: int) -> Measure:
        return _m(rec, f"s{number}.{side}.{mode}.turn{turn}")

    for turn in (2, 3):
        scenario.comparisons += [
            Comparison(f"turn {turn} TTFT: ours (vLLM engine, session) vs vllm serve", m("ours-vllm", "session", turn),
                       m("vllm", "history", turn), target=_better_by(factor)),
            Comparison(f"turn {turn} TTFT: ours (vLLM engine, resent history) vs vllm serve",
                       m("ours-vllm", "history", turn), m("vllm", "history", turn)),
        ]
        if extra_side:
            scenario.comparisons.append(Comparison(
                f"turn {turn} TTFT: ours (transformers engine, session) vs vllm serve", m(*extra_side, turn),
                m("vllm", "history", turn)))
    scenario.comparisons.append(Comparison("turn 1 TTFT (cold, for reference): ours (vLLM engine) vs vllm serve",
                                           m("ours-vllm", "session", 1), m("vllm", "history", 1)))
    scenario.extra = {k: v for k, v in rec.extra.items() if k.startswith(f"s{number}.")}
    return scenario


def _returning(s: BenchSettings, rec: Recorder) -> Scenario:
    w = s.workload
    scenario = Scenario(12, "Peer: the same image in a new conversation", (
        f"{_setup_common(s)}. A {w.peer_image_side}x{w.peer_image_side} image (5 tiles) in a first conversation; on "
        f"one replica, then {w.peer_between} conversations about other images of that size (more image tokens "
        "than vLLM's encoder cache holds), then the image again in a new conversation whose prefix differs before "
        "the image: another system prompt, or a question and answer before it (then again other images, then the "
        f"other variant); on {w.peer_replicas} replicas (vllm serve behind round robin, ours with affinity), the "
        f"image's first conversation and its two returns, each vllm serve request on another replica; "
        f"{w.peer_return_tokens} tokens each"))

    def m(side: str, where: str, variant: str) -> Measure:
        return _m(rec, f"s12.{side}.{where}.{variant}")

    for where, label in (("1", "one replica"), ("3", "another replica")):
        for variant, before in (("system", "another system prompt"), ("question", "a question before it")):
            scenario.comparisons.append(Comparison(
                f"{label}, {before}: TTFT, ours (vLLM engine) vs vllm serve", m("ours-vllm", where, variant),
                m("vllm", where, variant), target=_better_by(10.0)))
        scenario.comparisons.append(Comparison(
            f"{label}: the image's first conversation TTFT (for reference)", m("ours-vllm", where, "first"),
            m("vllm", where, "first")))
    scenario.extra = {k: v for k, v in rec.extra.items() if k.startswith("s12.")}
    return scenario


def _decode(s: BenchSettings, rec: Recorder) -> Scenario:
    w = s.workload
    scenario = Scenario(14, "Peer: decode throughput", (
        f"{_setup_common(s)}. {w.concurrency} text-only streams released together, {w.peer_decode_tokens} tokens "
        "each; tokens/s from the first request to the last token, and decode-phase tokens/s (tokens after each "
        "stream's first, over the union of the streams' decode intervals); one replica each"))

    def m(side: str, what: str) -> Measure:
        return _m(rec, f"s14.{side}.{what}")

    scenario.comparisons += [
        Comparison("decode-phase tokens/s: ours, vLLM engine vs transformers engine",
                   m("ours-vllm", "decode_per_s"), m("ours-transformers", "decode_per_s"), higher_is_better=True,
                   target=Target(">= 1.5x", min_ratio=1.5)),
        Comparison("tokens/s: ours, vLLM engine vs transformers engine", m("ours-vllm", "tokens_per_s"),
                   m("ours-transformers", "tokens_per_s"), higher_is_better=True),
        Comparison("decode-phase tokens/s: ours (vLLM engine) vs vllm serve", m("ours-vllm", "decode_per_s"),
                   m("vllm", "decode_per_s"), higher_is_better=True),
        Comparison("decode-phase tokens/s: ours (transformers engine) vs vllm serve",
                   m("ours-transformers", "decode_per_s"), m("vllm", "decode_per_s"), higher_is_better=True),
    ]
    scenario.extra = {k: v for k, v in rec.extra.items() if k.startswith("s14.")}
    return scenario
