"""Scenario 10, arrivals with nothing reused: scenario 9's Poisson arrivals of text, one-image and two-image requests,
at two rates, sent to each side of the peer benchmark through its OpenAI API.

The rates come from `vllm serve`'s own capacity (the system compared against): before the first run, unloaded
requests of each kind (fresh images and questions every round, so no cache of vLLM's helps) give each kind's time to
first token and decode step; the mean service time on the mix and its capacity follow as in scenario 9
(`bench.arrivals.mean_service_s`), and each rate is `Workload.peer_arrival_loads` x that capacity. The same
calibration sets the SLO of goodput (TTFT and TPOT within `arrival_slo_ttft` / `arrival_slo_tpot` x the unloaded
two-image request's). Every side then serves the very same requests at the very same times (scenario 9's generator:
`workload.arrival_requests`): each request its own thread, sent at its arrival time, timed from it; the images are
new to every side (each side has caches of its own, and every request and rate has images of its own).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from typing import Any

from bench import workload as W
from bench.arrivals import LEAD_S, METRICS, Served, Slo, delta_token_times, mean_service_s, run_stats
from bench.peer.openai_stream import StreamTiming, image_url_part, stream_chat, text_part
from bench.peer.sides import Side
from bench.phases import Recorder
from bench.settings import BenchSettings
from bench.stack import in_threads

log = logging.getLogger("bench")

CALIBRATION = "s10.calibration"
# Scenario 10's calibration images and questions (seed namespace 10; arrivals use scenario 9's generator).
CALIBRATION_SEED = 10


def load_key(load: float) -> str:
    return f"load{load:g}"


def measure_key(side: str, load: float, metric: str) -> str:
    return f"s10.{side}.{load_key(load)}.{metric}"


def _messages(req: W.ArrivalRequest) -> list[dict]:
    return [{"role": "user", "content": [*(image_url_part(data) for data in req.images), text_part(req.question)]}]


def _calibration_requests(s: BenchSettings, round_: int) -> list[W.ArrivalRequest]:
    """One request of each kind, the longest max_new_tokens, images and question new to this round."""
    w = s.workload
    return [W.ArrivalRequest(k, 0.0, tuple(W.image_png(W.seed(CALIBRATION_SEED, round_, 2 * k + j),
                                                       w.arrival_image_side) for j in range(k)),
                             f"{W.QUESTIONS[k % len(W.QUESTIONS)]} (calibration {round_ + 1})",
                             max(w.arrival_new_tokens))
            for k in range(len(W.ARRIVAL_KINDS))]


def calibrate(s: BenchSettings, side: Side, rec: Recorder) -> dict[str, Any]:
    """The rates, the SLO and the capacity from unloaded requests to `side` (`vllm serve`); measured once a run."""
    if CALIBRATION in rec.extra:
        return rec.extra[CALIBRATION]
    w = s.workload
    samples: dict[str, list[tuple[float, float]]] = {kind: [] for kind in W.ARRIVAL_KINDS}
    for round_ in range(w.arrival_calibration_runs):
        for req in _calibration_requests(s, round_):
            t = stream_chat(side.endpoint, _messages(req), req.max_new_tokens)
            step = (t.deltas[-1][0] - t.deltas[0][0]) / (t.tokens - 1) if t.tokens > 1 else math.nan
            samples[req.kind].append((t.ttft_s, step))
    kinds = {}
    for kind, runs in samples.items():
        steps = [step for _, step in runs if not math.isnan(step)]
        kinds[kind] = {"ttft_s": statistics.median(ttft for ttft, _ in runs),
                       "step_s": statistics.median(steps) if steps else 0.0, "samples": [list(x) for x in runs]}
        log.info("  peer calibration on %s, %s: TTFT %.3fs, decode step %.4fs", side.label, kind,
                 kinds[kind]["ttft_s"], kinds[kind]["step_s"])
    service = mean_service_s(kinds, w.arrival_mix, statistics.fmean(w.arrival_new_tokens))
    heaviest = kinds[W.ARRIVAL_KINDS[-1]]
    cal = {"measured_on": side.label, "kinds": kinds, "mean_service_s": service, "capacity_rps": 1.0 / service,
           "loads": list(w.peer_arrival_loads), "rates_rps": [load / service for load in w.peer_arrival_loads],
           "slo_ttft_s": w.arrival_slo_ttft * heaviest["ttft_s"], "slo_tpot_s": w.arrival_slo_tpot * heaviest["step_s"]}
    log.info("  %s: mean service time %.2fs, capacity %.3f req/s; rates %s req/s", side.label, service,
             cal["capacity_rps"], ", ".join(f"{x:.3f}" for x in cal["rates_rps"]))
    rec.extra[CALIBRATION] = cal
    return cal


def serve(side: Side, requests: list[W.ArrivalRequest]) -> tuple[list[Served], list[dict]]:
    """Every request on its own thread, sent at its arrival time; (served, usages)."""
    t0 = time.perf_counter() + LEAD_S

    def one(i: int) -> StreamTiming:
        req = requests[i]
        delay = t0 + req.arrival_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        return stream_chat(side.endpoint, _messages(req), req.max_new_tokens, started=t0 + req.arrival_s)

    timings = in_threads(one, len(requests))
    served = [Served(req.index, req.kind, req.max_new_tokens, req.arrival_s,
                     delta_token_times(t.deltas, t0)[:req.max_new_tokens])
              for req, t in zip(requests, timings, strict=True)]
    return served, [t.usage for t in timings]


def run(s: BenchSettings, side: Side, calibrated_on: Side, rec: Recorder, r: int, load_index: int) -> None:
    """`side` over repeat r's arrivals at one rate (calibrated on `calibrated_on` first if need be)."""
    w = s.workload
    cal = calibrate(s, calibrated_on, rec)
    load, rate = cal["loads"][load_index], cal["rates_rps"][load_index]
    requests = W.arrival_requests(r, load_index, w.peer_arrival_requests, rate, w.arrival_mix, w.arrival_new_tokens,
                                  w.arrival_image_side)
    log.info("peer 10: %s, %d requests at %.3f req/s (%gx)", side.label, len(requests), rate, load)
    served, usages = serve(side, requests)
    stats = run_stats(served, Slo(cal["slo_ttft_s"], cal["slo_tpot_s"]))
    for metric, (label, unit) in METRICS.items():
        rec.add(measure_key(side.name, load, metric), f"{side.label} {label}, {load:g}x load", unit, stats[metric])
    rec.note(f"s10.runs.{side.name}.{load_key(load)}", {
        "rate_rps": rate, "span_s": stats["span_s"], "tokens": stats["tokens"], "requests": len(served),
        "requests_at_max_new_tokens": sum(x.tokens == x.max_new_tokens for x in served),
        "cached_prompt_tokens": sum((u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0 for u in usages),
        "prompt_tokens": sum(u.get("prompt_tokens") or 0 for u in usages),
        "served": [x.to_dict() for x in served]})
