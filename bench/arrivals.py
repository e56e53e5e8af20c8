"""Scenario 9, arrivals: requests arriving at random times, at two request rates, served by three systems.

The rates come from the machine's measured capacity: before the first run, unloaded `chat()`s of each request kind
(text-only, one image, two images; `workload.calibration_requests`, `Workload.arrival_calibration_runs` rounds, the
medians taken) give each kind's time to first token and decode step; chat()'s mean service time on the mix is E[S] = sum over kinds of p(kind) x (TTFT(kind) + (E[max_new_tokens] - 1)
x step(kind)), its capacity 1 / E[S] requests/s, and each rate `load` x that capacity (`Workload.arrival_loads`,
0.5 and 0.9: the seed's own serving path at half and at 90% utilisation, both below its saturation, so every
system's queue stays finite). The same calibration sets the SLO of goodput (TTFT and TPOT within a factor of the
unloaded two-image request's) and the batching window (a factor of E[S]). It is recorded once (`s9.calibration`), so
a `--resume` keeps the same rates.

The three systems see the same requests (`workload.arrival_requests`) at the same times:

- the stack: every request its own thread, which sends it as a streamed gateway `Chat` at its arrival time; times
  are taken from the arrival, so a late thread counts against the stack;
- the seed's sequential `chat()`: one worker in this process serving the arrivals first come first served; a request
  waits while the worker is busy, and its TTFT includes that wait;
- the seed's `batch_chat()` over a window: one worker; when it is free, the next batch starts `window` seconds after
  its first waiting request arrived (at once if that is past, or as soon as `max_batch` requests wait), takes every
  request arrived by then (at most `max_batch`) and runs them as one left-padded generate to the longest
  max_new_tokens among them. Each row keeps its own first max_new_tokens tokens, timed at the batch's decoding steps
  (`Generation.step_times`): as if batch_chat streamed, which favours it (the original returns at the end).

Per request: arrival, every token's time (so the first token's). Per run (`run_stats`): TTFT p50/p99, TPOT p50/p99
(per request, (last token - first) / (tokens - 1), requests of at least two tokens), ITL p50/p99 (every gap between
consecutive tokens of a request, pooled over the requests; tokens that came in one delta have gaps of 0), throughput
(output tokens / the run's span, from the first arrival to the last token) and goodput (requests within the SLO /
the same span). Percentiles interpolate linearly between order statistics (numpy's default).
"""

from __future__ import annotations

import itertools
import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from bench import workload as W
from bench.settings import BenchSettings
from bench.stack import ChatTiming, RunningStack, chat, image_part, in_threads, text_part

if TYPE_CHECKING:  # phases runs this module's measurements, so it cannot be imported from here at run time
    from bench.baseline import Baseline, Generation
    from bench.phases import Recorder

log = logging.getLogger("bench")

SYSTEMS = {"stack": "stack", "chat": "sequential chat()", "batch": "windowed batch_chat"}
METRICS = {  # key: (label, unit)
    "ttft_p50": ("p50 TTFT", "s"), "ttft_p99": ("p99 TTFT", "s"),
    "tpot_p50": ("p50 TPOT", "s"), "tpot_p99": ("p99 TPOT", "s"),
    "itl_p50": ("p50 ITL", "s"), "itl_p99": ("p99 ITL", "s"),
    "throughput": ("output tokens/s", "tok/s"), "goodput": ("goodput (requests within the SLO)", "req/s"),
    "within_slo": ("requests within the SLO", "%"),
}
# The first arrival comes this long after a run is set up (the stack's threads are all started by then).
LEAD_S = 0.5


# ------------------------------------------------------------------------------------------------ arithmetic


@dataclass
class Served:
    """One request as a system answered it; times in seconds since the run's first arrival."""

    index: int
    kind: str
    max_new_tokens: int
    arrival: float
    token_times: list[float] = field(default_factory=list)
    # The baselines: when the worker began on it, and how many requests shared its batch.
    start: float | None = None
    batch: int = 1

    @property
    def tokens(self) -> int:
        return len(self.token_times)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival if self.token_times else math.nan

    @property
    def tpot(self) -> float:
        """(last token - first) / (tokens - 1); NaN for a request of fewer than two tokens."""
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else math.nan

    def gaps(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.token_times)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["token_times"] = [round(t, 6) for t in self.token_times]
        return d


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the closest order statistics (numpy's default); NaN when empty."""
    v = sorted(x for x in values if not math.isnan(x))
    if not v:
        return math.nan
    pos = (len(v) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(v) - 1)
    return v[low] + (v[high] - v[low]) * (pos - low)


@dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float

    def met(self, r: Served) -> bool:
        """TTFT within its bound, and TPOT too where there is one (a one-token answer has none)."""
        if not r.token_times or r.ttft > self.ttft_s:
            return False
        return r.tokens < 2 or r.tpot <= self.tpot_s


def run_stats(served: Sequence[Served], slo: Slo) -> dict[str, float]:
    """One run's figures (module doc); `span_s` from the first arrival to the last token."""
    answered = [r for r in served if r.token_times]
    if not answered:
        return {key: math.nan for key in (*METRICS, "span_s", "tokens")}
    span = max(r.token_times[-1] for r in answered) - min(r.arrival for r in served)
    ttfts = [r.ttft for r in answered]
    tpots = [r.tpot for r in answered if r.tokens > 1]
    itls = [g for r in answered for g in r.gaps()]
    tokens = sum(r.tokens for r in answered)
    met = sum(slo.met(r) for r in served)
    return {
        "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
        "tpot_p50": percentile(tpots, 50), "tpot_p99": percentile(tpots, 99),
        "itl_p50": percentile(itls, 50), "itl_p99": percentile(itls, 99),
        "throughput": tokens / span if span > 0 else math.nan,
        "goodput": met / span if span > 0 else math.nan,
        "within_slo": 100.0 * met / len(served),
        "span_s": span, "tokens": float(tokens),
    }


def window_batch(arrivals: Sequence[float], first: int, free_at: float, window: float,
                 max_batch: int) -> tuple[float, int]:
    """(start, end): the worker, free at `free_at`, runs requests [first, end) as one batch from `start`.

    The batch starts `window` after request `first` arrived, or as soon as `max_batch` requests have arrived if that
    is earlier, but never before the worker is free; it holds every request arrived by its start, at most
    `max_batch`. Arrivals are sorted. With window 0 and max_batch 1 this is a first-come-first-served single worker.
    """
    ready = arrivals[first] + window
    if first + max_batch - 1 < len(arrivals):
        ready = min(ready, arrivals[first + max_batch - 1])
    start = max(free_at, ready)
    end = first
    while end < len(arrivals) and end - first < max_batch and arrivals[end] <= start:
        end += 1
    return start, end


def mean_service_s(kinds: dict[str, dict[str, float]], mix: Sequence[float], mean_new_tokens: float) -> float:
    """chat()'s mean service time on the mix: sum of p(kind) x (TTFT + (mean tokens - 1) x decode step)."""
    total = sum(mix)
    return sum(p / total * (kinds[name]["ttft_s"] + (mean_new_tokens - 1) * kinds[name]["step_s"])
               for p, name in zip(mix, W.ARRIVAL_KINDS, strict=True))


# ------------------------------------------------------------------------------------------------- baselines


def _sleep_until(t: float) -> None:
    delay = t - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def _prepare(bl: Baseline, req: W.ArrivalRequest) -> tuple[str, torch.Tensor | None]:
    """The prompt and tiles chat() makes of one request (the original's load_image per image, then the prompt)."""
    tiles = [W.tiles(data) for data in req.images]
    prompt = bl.mixed_prompt(req.question, [t.shape[0] for t in tiles])
    return prompt, torch.cat(tiles) if tiles else None


def _chat_once(bl: Baseline, req: W.ArrivalRequest) -> tuple[float, Generation]:
    started = time.perf_counter()
    prompt, pixels = _prepare(bl, req)
    return started, bl.generate([prompt], pixels, req.max_new_tokens)


def calibrate(s: BenchSettings, bl: Baseline, rec: Recorder) -> dict[str, Any]:
    """The rates, the SLO and the window, from unloaded chat()s of each kind (module doc); measured once a run."""
    if "s9.calibration" in rec.extra:
        return rec.extra["s9.calibration"]
    w = s.workload
    samples: dict[str, list[tuple[float, float, int]]] = {kind: [] for kind in W.ARRIVAL_KINDS}
    for _ in range(w.arrival_calibration_runs):
        for req in W.calibration_requests(w.arrival_new_tokens, w.arrival_image_side):
            started, g = _chat_once(bl, req)
            steps = len(g.step_times)
            samples[req.kind].append((g.step_times[0] - started, g.decode_s / (steps - 1) if steps > 1 else math.nan,
                                      steps))
    kinds: dict[str, dict[str, float]] = {}
    for kind, runs in samples.items():
        steps = [step for _, step, _ in runs if not math.isnan(step)]
        kinds[kind] = {"ttft_s": statistics.median(ttft for ttft, _, _ in runs),
                       "step_s": statistics.median(steps) if steps else math.nan,
                       "tokens": max(n for _, _, n in runs), "samples": [list(run) for run in runs]}
        log.info("  calibration, %s: TTFT %.3fs, decode step %.4fs (medians of %d runs)", kind,
                 kinds[kind]["ttft_s"], kinds[kind]["step_s"], len(runs))
    known = [k["step_s"] for k in kinds.values() if not math.isnan(k["step_s"])]
    for k in kinds.values():  # an answer that stopped at once: the other kinds' step
        if math.isnan(k["step_s"]):
            k["step_s"] = statistics.median(known) if known else 0.0
    mean_tokens = statistics.fmean(w.arrival_new_tokens)
    service = mean_service_s(kinds, w.arrival_mix, mean_tokens)
    heaviest = kinds[W.ARRIVAL_KINDS[-1]]
    cal = {
        "kinds": kinds, "mean_new_tokens": mean_tokens, "mean_service_s": service, "capacity_rps": 1.0 / service,
        "loads": list(w.arrival_loads), "rates_rps": [load / service for load in w.arrival_loads],
        "window_s": w.arrival_window * service, "max_batch": w.arrival_max_batch,
        "slo_ttft_s": w.arrival_slo_ttft * heaviest["ttft_s"], "slo_tpot_s": w.arrival_slo_tpot * heaviest["step_s"],
    }
    log.info("  chat() mean service time %.2fs: capacity %.3f req/s; rates %s req/s; window %.2fs; SLO TTFT <= "
             "%.2fs, TPOT <= %.1f ms", service, cal["capacity_rps"], ", ".join(f"{r:.3f}" for r in cal["rates_rps"]),
             cal["window_s"], cal["slo_ttft_s"], 1e3 * cal["slo_tpot_s"])
    rec.extra["s9.calibration"] = cal
    return cal


def requests_for(s: BenchSettings, cal: dict[str, Any], r: int, load_index: int) -> list[W.ArrivalRequest]:
    w = s.workload
    return W.arrival_requests(r, load_index, w.arrival_requests, cal["rates_rps"][load_index], w.arrival_mix,
                              w.arrival_new_tokens, w.arrival_image_side)


def serve_windowed(bl: Baseline, requests: Sequence[W.ArrivalRequest], window: float,
                   max_batch: int) -> tuple[list[Served], float]:
    """One worker over the arrivals (window 0, max_batch 1: sequential chat()); (served, seconds it computed)."""
    arrivals = [r.arrival_s for r in requests]
    served: list[Served] = []
    busy = 0.0
    t0 = time.perf_counter() + LEAD_S
    first = 0
    while first < len(requests):
        start, end = window_batch(arrivals, first, time.perf_counter() - t0, window, max_batch)
        _sleep_until(t0 + start)
        batch = requests[first:end]
        began = time.perf_counter()
        prepared = [_prepare(bl, req) for req in batch]
        pixels = [p for _, p in prepared if p is not None]
        g = bl.generate([prompt for prompt, _ in prepared], torch.cat(pixels) if pixels else None,
                        max(req.max_new_tokens for req in batch))
        busy += time.perf_counter() - began
        for req, ids in zip(batch, g.ids, strict=True):
            n = min(len(ids), req.max_new_tokens, len(g.step_times))
            served.append(Served(req.index, req.kind, req.max_new_tokens, req.arrival_s,
                                 [t - t0 for t in g.step_times[:n]], start=began - t0, batch=len(batch)))
        first = end
    return served, busy


# ----------------------------------------------------------------------------------------------------- stack


def delta_token_times(deltas: Sequence[tuple[float, int]], t0: float) -> list[float]:
    """Each token's time since `t0` from a stream's (arrival time, tokens) deltas: a delta's tokens all came at its
    arrival."""
    return [when - t0 for when, n in deltas for _ in range(n)]


def serve_stack(stack: RunningStack, requests: Sequence[W.ArrivalRequest]) -> tuple[list[Served], list[dict]]:
    """Every request a streamed gateway Chat on its own thread, sent at its arrival time; (served, usages)."""
    t0 = time.perf_counter() + LEAD_S

    def one(i: int) -> ChatTiming:
        req = requests[i]
        _sleep_until(t0 + req.arrival_s)
        content = [*(image_part(data) for data in req.images), text_part(req.question)]
        return chat(stack.chat, content, req.max_new_tokens, started=t0 + req.arrival_s)

    timings = in_threads(one, len(requests))
    served = [Served(req.index, req.kind, req.max_new_tokens, req.arrival_s,
                     delta_token_times(t.deltas, t0)[:req.max_new_tokens])
              for req, t in zip(requests, timings, strict=True)]
    return served, [t.usage for t in timings]


# --------------------------------------------------------------------------------------------------- records


def load_key(load: float) -> str:
    return f"load{load:g}"


def measure_key(system: str, load: float, metric: str) -> str:
    return f"s9.{system}.{load_key(load)}.{metric}"


def _record(rec: Recorder, cal: dict[str, Any], system: str, load_index: int, served: list[Served],
            extra: dict[str, Any]) -> None:
    load = cal["loads"][load_index]
    stats = run_stats(served, Slo(cal["slo_ttft_s"], cal["slo_tpot_s"]))
    for metric, (label, unit) in METRICS.items():
        rec.add(measure_key(system, load, metric), f"{SYSTEMS[system]} {label}, {load:g}x load", unit, stats[metric])
    full = sum(r.tokens == r.max_new_tokens for r in served)
    rec.note(f"s9.runs.{system}.{load_key(load)}", {
        "rate_rps": cal["rates_rps"][load_index], "span_s": stats["span_s"], "tokens": stats["tokens"],
        "requests_at_max_new_tokens": full, "requests": len(served), **extra,
        "served": [r.to_dict() for r in served]})
    if full < len(served):
        log.info("  %d of %d answers stopped before their max_new_tokens", len(served) - full, len(served))


def run_baseline(s: BenchSettings, bl: Baseline, rec: Recorder, r: int, load_index: int, system: str) -> None:
    """chat() (`system` "chat") or windowed batch_chat ("batch") over repeat r's arrivals at one rate."""
    cal = calibrate(s, bl, rec)
    requests = requests_for(s, cal, r, load_index)
    window, max_batch = (cal["window_s"], cal["max_batch"]) if system == "batch" else (0.0, 1)
    log.info("baseline: arrivals, %s, %d requests at %.3f req/s (%gx)", SYSTEMS[system], len(requests),
             cal["rates_rps"][load_index], cal["loads"][load_index])
    served, busy = serve_windowed(bl, requests, window, max_batch)
    span = max((x.token_times[-1] for x in served if x.token_times), default=math.nan)
    _record(rec, cal, system, load_index, served, {
        "busy_s": busy, "busy_fraction": busy / span if span > 0 else math.nan,
        "batches": len({x.start for x in served}), "mean_batch": statistics.fmean(x.batch for x in served)})


def run_stack(s: BenchSettings, stack: RunningStack, rec: Recorder, r: int, load_index: int,
              baseline: Any) -> None:
    """The stack over repeat r's arrivals at one rate. `baseline`: a callable giving the loaded Baseline, used only
    when the calibration is still to be measured (a run whose first scenario-9 side is the stack's)."""
    cal = rec.extra.get("s9.calibration") or calibrate(s, baseline(), rec)
    requests = requests_for(s, cal, r, load_index)
    log.info("stack: arrivals, %d requests at %.3f req/s (%gx)", len(requests), cal["rates_rps"][load_index],
             cal["loads"][load_index])
    served, usages = serve_stack(stack, requests)
    images = sum(len(req.images) for req in requests)
    encoded = sum(u.get("encoded_tiles", 0) for u in usages)
    reused = sum(u.get("reused_tiles", 0) for u in usages)
    if reused:
        log.warning("  %d of the arrivals' image tiles hit the vision cache; their images were meant to be new", reused)
    _record(rec, cal, "stack", load_index, served, {"images": images, "encoded_tiles": encoded,
                                                   "reused_tiles": reused})
