"""The benchmark's scenarios 1-9 as comparisons of recorded measures, each with its target where one is set (the peer
benchmark's 10-14 are built in bench.peer.scenarios).

Ratios are always ours / baseline of the medians; `Target` says which side of it is asked for. `build` returns the
scenarios of `BenchSettings.scenarios`, in order.
"""

from __future__ import annotations

import math
import statistics

from bench import arrivals, pool
from bench.peer import scenarios as peer_scenarios
from bench.phases import Recorder
from bench.results import Comparison, Measure, Scenario, Target
from bench.settings import BenchSettings
from bench.workload import ARRIVAL_KINDS
from gateway.config import GatewayConfig

MIB = 2**20
# The gateway's default load bound of affinity routing, which the benchmark's stacks run with.
ROUTING_EPSILON = GatewayConfig.__dataclass_fields__["routing_epsilon"].default


def _m(rec: Recorder, key: str) -> Measure:
    """The recorded measure, or an empty one (a scenario that did not run shows as missing, not as a crash)."""
    return rec.measures.get(key) or Measure(key, "")


def _const(label: str, unit: str, value: float) -> Measure:
    return Measure(label, unit, [value])


def build(s: BenchSettings, rec: Recorder, limits: dict | None) -> list[Scenario]:
    """The selected scenarios; `limits` (the machine's, see `machine.measure_limits`) is needed for 7 only."""
    out = _build_1_to_5(s, rec)
    out.append(_memory(rec))
    if 7 in s.scenarios:
        out.append(_limits(s, rec, limits))
    out.append(_scaled_pool(s, rec))
    out.append(_arrivals(s, rec))
    out += peer_scenarios.build(s, rec)
    return [scenario for scenario in out if scenario.number in s.scenarios]


def _build_1_to_5(s: BenchSettings, rec: Recorder) -> list[Scenario]:
    w = s.workload
    e = rec.extra
    tiles = e.get("s1.tiles", ["?"])[0]
    out = []

    out.append(Scenario(1, "Embedding cache", f"vision Encode of one {w.cache_image_side}x{w.cache_image_side} image "
                        f"(max_num {w.cache_max_num}: {tiles} tiles with the thumbnail), then {w.hit_calls} Encodes of "
                        "the same image; fresh image per repeat", [
        Comparison("Encode latency, hit vs miss", _m(rec, "s1.hit"), _m(rec, "s1.miss"),
                   target=Target(">= 100x faster", max_ratio=0.01)),
    ]))

    s2 = Scenario(2, "Multi-round session", f"3 turns about one {w.session_image_side}x{w.session_image_side} image "
                  f"(max_num {w.session_max_num}), {w.turn_new_tokens} new tokens per turn; ours continues the "
                  "session, the baseline re-runs chat() with history (re-encoding the image)")
    for turn in (2, 3):
        s2.comparisons.append(Comparison(f"turn {turn} time to first token", _m(rec, f"s2.ours.turn{turn}"),
                                         _m(rec, f"s2.baseline.turn{turn}"), target=Target(">= 20x faster",
                                                                                             max_ratio=0.05)))
    s2.comparisons.append(Comparison("turn 1 time to first token (cold, for reference)", _m(rec, "s2.ours.turn1"),
                                     _m(rec, "s2.baseline.turn1")))
    s2.extra = {k: e[k] for k in ("s2.usage.turn1", "s2.usage.turn2", "s2.usage.turn3") if k in e}
    out.append(s2)

    out.append(Scenario(3, "Concurrency", f"{w.concurrency} concurrent requests, each with its own "
                        f"{w.concurrency_image_side}x{w.concurrency_image_side} image (1 tile), "
                        f"{w.concurrency_new_tokens} new tokens; aggregate generated tokens/s from first request to "
                        "last token", [
        Comparison("tokens/s vs sequential chat()", _m(rec, "s3.ours"), _m(rec, "s3.sequential"),
                   higher_is_better=True, target=Target(">= 3x", min_ratio=3.0)),
        Comparison("tokens/s vs padded batch_chat", _m(rec, "s3.ours"), _m(rec, "s3.batch_chat"),
                   higher_is_better=True, target=Target(">= 1.0x", min_ratio=1.0)),
        Comparison("decode-phase tokens/s vs sequential chat()", _m(rec, "s3.ours.decode"),
                   _m(rec, "s3.sequential.decode"), higher_is_better=True,
                   note="only the window where all streams decode together, vs the baseline's decode phases"),
        Comparison("decode-phase tokens/s vs batch_chat", _m(rec, "s3.ours.decode"), _m(rec, "s3.batch_chat.decode"),
                   higher_is_better=True, target=Target(">= 1.0x", min_ratio=1.0)),
    ], {k: e[k] for k in ("s3.tokens_per_request.ours", "s3.tokens_per_request.baseline", "s3.ttft_s.ours")
        if k in e}))

    out.append(Scenario(4, "Overhead of the split", f"one cold request ({w.overhead_image_side}x"
                        f"{w.overhead_image_side} image, {w.overhead_new_tokens} new tokens) end to end through the "
                        "gateway (Redis, vision, LLM) vs the in-process reference chat() on the same weights", [
        Comparison("end-to-end latency", _m(rec, "s4.ours"), _m(rec, "s4.reference"),
                   target=Target("<= 1.10x", max_ratio=1.10)),
    ], {"usage": e.get("s4.usage", [])}))

    out.append(Scenario(5, "Video", f"{w.video_frames} frames of {w.frame_side}x{w.frame_side} (1 tile each), "
                        f"{w.video_new_tokens} new tokens, end-to-end latency; 'cached' asks the same again in a new "
                        "session (vision cache and prefix cache hit)", [
        Comparison("frames cached vs cold (1 replica)", _m(rec, "s5.cached.1"), _m(rec, "s5.cold.1")),
        Comparison("cold: 2 vision replicas vs 1", _m(rec, "s5.cold.2"), _m(rec, "s5.cold.1"),
                   note=f"{e.get('machine_cpus', '?')} CPUs shared by both replicas"),
        Comparison("cold through the stack vs chat()", _m(rec, "s5.cold.1"), _m(rec, "s5.baseline")),
        Comparison("cached through the stack vs chat()", _m(rec, "s5.cached.1"), _m(rec, "s5.baseline")),
    ], {k: v for k, v in e.items() if k.startswith("s5.usage")}))
    return out


def _memory(rec: Recorder) -> Scenario:
    e = rec.extra
    weights = e.get("weights", {})
    vision_w, llm_w = weights.get("vision_bytes", math.nan) / MIB, weights.get("llm_bytes", math.nan) / MIB
    warm = e.get("stack_rss_mib_warm", {})
    total = sum(v for v in warm.values() if v)
    scenario = Scenario(6, "Memory", "resident memory (VmRSS) of each process after warm-up, against the weights' "
                        "size in the benchmark dtype; the baseline is this process holding the native model")
    scenario.comparisons += [
        Comparison("vision service RSS vs its weights", _const("vision-0 RSS", "MiB", warm.get("vision-0", math.nan)),
                   _const("vision weights", "MiB", vision_w), competitive=False),
        Comparison("LLM service RSS vs its weights", _const("llm RSS", "MiB", warm.get("llm", math.nan)),
                   _const("LLM weights", "MiB", llm_w), competitive=False),
        Comparison("LLM service with 8 streams vs its weights", _m(rec, "s6.llm_streams"),
                   _const("LLM weights", "MiB", llm_w), competitive=False),
        Comparison("whole stack vs the baseline process", _const("stack RSS (all processes)", "MiB", total),
                   _const("baseline process peak RSS", "MiB", e.get("baseline_rss_mib_peak") or math.nan)),
    ]
    scenario.extra = {"rss_mib_after_warm_up": warm, "weights_mib": {"vision": vision_w, "llm": llm_w},
                      "baseline_rss_mib_loaded": e.get("baseline_rss_mib_loaded"),
                      "baseline_rss_mib_peak": e.get("baseline_rss_mib_peak"),
                      "rss_mib_at_end": {k: v for k, v in e.items() if k.startswith("stack_rss_mib_end")}}
    return scenario


def _limits(s: BenchSettings, rec: Recorder, limits: dict) -> Scenario:
    e = rec.extra
    bandwidth, flops = limits["read_bandwidth_bytes_per_s"], limits["matmul_flops_per_s"]
    step_bytes = e.get("decode_bytes_per_step", {}).get("total_bytes", math.nan)
    decode_floor = step_bytes / bandwidth
    tile_flops = e.get("vision_flops_per_tile", math.nan)
    tile_floor = tile_flops / flops
    scenario = Scenario(7, "Distance to the machine's limit",
                        f"read bandwidth {bandwidth / 1e9:.1f} GB/s and {s.dtype} matmul {flops / 1e9:.0f} GFLOP/s "
                        "measured with torch (best of the run's start and end); "
                        f"decode floor = {step_bytes / 1e9:.3f} GB read per step / bandwidth; "
                        f"tile floor = {tile_flops / 1e9:.0f} GFLOP per tile / matmul throughput; the bare modules "
                        "(the baseline's language model after a prefill of the decode prompt, its vision path on 5 "
                        "random tiles) are measured in the same repeats as the stack's decode step (a "
                        f"{s.workload.decode_new_tokens}-token text answer) and its encoder forward (scenario 1's "
                        "miss)")
    scenario.comparisons += [
        Comparison("single-stream decode step (through the stack) vs its floor", _m(rec, "s7.service_decode"),
                   _const("floor", "s", decode_floor), target=Target("<= 1.5x floor", max_ratio=1.5),
                   competitive=False),
        Comparison("vision encoder per tile (service forward) vs its floor", _m(rec, "s7.service_tile"),
                   _const("floor", "s", tile_floor), target=Target("<= 2x floor", max_ratio=2.0),
                   competitive=False),
        Comparison("single-stream decode step through the stack vs bare language-model decode step",
                   _m(rec, "s7.service_decode"), _m(rec, "s7.bare_decode"), target=Target("<= 1.1x", max_ratio=1.1)),
        Comparison("vision service encoder forward per tile vs bare vision path per tile",
                   _m(rec, "s7.service_tile"), _m(rec, "s7.bare_tile"), target=Target("<= 1.1x", max_ratio=1.1)),
        Comparison("bare language-model decode step vs the floor", _m(rec, "s7.bare_decode"),
                   _const("floor", "s", decode_floor), competitive=False),
        Comparison("bare vision path per tile vs the floor", _m(rec, "s7.bare_tile"),
                   _const("floor", "s", tile_floor), competitive=False),
    ]
    scenario.extra = {"limits": limits, "decode_bytes_per_step": e.get("decode_bytes_per_step"),
                      "vision_flops_per_tile": tile_flops,
                      "decode_tokens": e.get("s7.decode_tokens"),
                      "decode_floor_s": decode_floor, "tile_floor_s": tile_floor,
                      "bandwidth_note": "best of a full reduction and a matrix-vector product over a "
                                        f"{limits['buffer_bytes'] / MIB:.0f} MiB buffer"}
    return scenario


def _scaled_pool(s: BenchSettings, rec: Recorder) -> Scenario:
    w = s.workload
    e = rec.extra
    n, sessions = w.pool_replicas, w.pool_sessions
    bound = _const(f"(1 + {ROUTING_EPSILON}) x mean + 1", "sessions",
                   pool.balance_bound(sessions, n, ROUTING_EPSILON))
    every_turn = _const("every later turn", "%", 100.0)
    scenario = Scenario(8, "Scaled pool", f"sessions of 3 turns, each about its own {w.pool_image_side}x"
                        f"{w.pool_image_side} image (max_num {w.pool_max_num}), {w.pool_new_tokens} new tokens per "
                        f"turn, on 1 LLM replica, on {n} with affinity routing (--routing-epsilon {ROUTING_EPSILON}) "
                        f"and on {n} with round_robin (on a Redis Cluster of {w.pool_redis_masters} masters), each "
                        "starting with the embeddings cached and the prefix caches empty: "
                        f"{sessions} sessions one at a time (latency without queueing), then {sessions} others all at "
                        "once (a burst: balance and prefix hits under load); cells over the sessions; a later turn "
                        "hits when its cached prompt tokens cover the previous turn's prompt; sessions per replica = "
                        "its completed Generate calls / 3; then FetchEmbeddings of one session image's embeddings "
                        f"through the vision service, {w.fetch_calls} calls, from the single Redis and from the "
                        "cluster")

    def m(config: str, what: str) -> Measure:
        return _m(rec, f"s8.{config}.{what}")

    scenario.comparisons += [
        Comparison(f"turn 2 TTFT, one at a time: {n} replicas (affinity) vs 1 replica",
                   m("affinity", "sequential.turn2"), m("1", "sequential.turn2"),
                   target=Target("within 1.2x", max_ratio=1.2)),
        Comparison(f"turn 2 TTFT, one at a time: affinity vs round_robin ({n} replicas)",
                   m("affinity", "sequential.turn2"), m("round_robin", "sequential.turn2"),
                   target=Target(">= 5x faster", max_ratio=0.2)),
        Comparison(f"turn 3 TTFT, one at a time: {n} replicas (affinity) vs 1 replica",
                   m("affinity", "sequential.turn3"), m("1", "sequential.turn3")),
        Comparison(f"turn 3 TTFT, one at a time: affinity vs round_robin ({n} replicas)",
                   m("affinity", "sequential.turn3"), m("round_robin", "sequential.turn3")),
        Comparison(f"turn 2 TTFT, all at once: {n} replicas (affinity) vs 1 replica",
                   m("affinity", "concurrent.turn2"), m("1", "concurrent.turn2")),
        Comparison(f"turn 2 TTFT, all at once: affinity vs round_robin ({n} replicas)",
                   m("affinity", "concurrent.turn2"), m("round_robin", "concurrent.turn2")),
        Comparison("prefix hit rate, all at once, affinity", m("affinity", "concurrent.hit_rate"), every_turn,
                   higher_is_better=True, target=Target(">= 95% of later turns", min_ratio=0.95), competitive=False),
        Comparison("prefix hit rate, one at a time, affinity", m("affinity", "sequential.hit_rate"), every_turn,
                   higher_is_better=True, competitive=False),
        Comparison("prefix hit rate, all at once, round_robin", m("round_robin", "concurrent.hit_rate"), every_turn,
                   higher_is_better=True, competitive=False),
        Comparison("most sessions on one replica, all at once, affinity", m("affinity", "concurrent.max_sessions"),
                   bound, target=Target("<= the bound", max_ratio=1.0), competitive=False),
        Comparison(f"FetchEmbeddings: Redis Cluster ({w.pool_redis_masters} masters) vs single Redis",
                   _m(rec, "s8.fetch.cluster"), _m(rec, "s8.fetch.single"), target=Target("<= 1.2x", max_ratio=1.2),
                   note=f"{e.get('s8.fetch.bytes', '?')} bytes per call"),
    ]
    scenario.extra = {k: v for k, v in e.items() if k.startswith("s8.") or k == "stack_startup_s_round_robin"}
    return scenario


def _arrivals(s: BenchSettings, rec: Recorder) -> Scenario:
    w = s.workload
    e = rec.extra
    cal = e.get("s9.calibration") or {}
    loads = list(cal.get("loads") or w.arrival_loads)
    rates = cal.get("rates_rps") or [math.nan] * len(loads)
    high = max(loads)

    def m(system: str, load: float, metric: str) -> Measure:
        return _m(rec, arrivals.measure_key(system, load, metric))

    def secs(key: str) -> str:
        return f"{cal.get(key, math.nan):.2f} s"

    kinds = cal.get("kinds", {})
    two = ARRIVAL_KINDS[-1]
    scenario = Scenario(9, "Arrivals", (
        f"{w.arrival_requests} requests per rate, Poisson arrivals (seeded exponential gaps, the same sequence of "
        f"requests at every rate) at {' and '.join(f'{load:g}x' for load in loads)} the sequential chat() capacity: "
        f"{' and '.join(f'{r:.3f}' for r in rates)} requests/s. Capacity = 1 / chat()'s mean service time on this "
        f"mix, {secs('mean_service_s')}, estimated before the first run from {w.arrival_calibration_runs} unloaded "
        "chat()s of each kind (sum over kinds of p(kind) x (its median TTFT + (mean max_new_tokens - 1) x its median "
        "decode step)). Requests: text-only, "
        f"one or two fresh {w.arrival_image_side}x{w.arrival_image_side} images (one tile each; new per request and "
        f"rate, so the vision cache misses) with probabilities {', '.join(f'{p:g}' for p in w.arrival_mix)}; "
        f"max_new_tokens uniform over {', '.join(map(str, w.arrival_new_tokens))} (greedy on random weights, which "
        "rarely stops before it; actual counts recorded per request). Stack: each request its own streamed gateway "
        "Chat, sent by its own thread at its arrival time. chat(): one worker serving the arrivals first come first "
        "served (TTFT includes the queueing). Windowed batch_chat: one worker; a batch starts "
        f"{secs('window_s')} ({w.arrival_window:g} x the mean service time) after its first request arrived, at once "
        f"if the worker frees up later or when {w.arrival_max_batch} wait, holds every request arrived by then and "
        "runs as one left-padded generate to its longest max_new_tokens, each row keeping its own (rows timed at the "
        "batch's steps, as if batch_chat streamed). TTFT from arrival; TPOT = (last token - first) / (tokens - 1) "
        "per request; ITL = every gap between consecutive tokens, pooled; throughput = output tokens / (last token - "
        "first arrival); goodput = requests within the SLO / the same span, SLO: TTFT <= "
        f"{secs('slo_ttft_s')} ({w.arrival_slo_ttft:g} x chat()'s unloaded TTFT of a two-image request, "
        f"{kinds.get(two, {}).get('ttft_s', math.nan):.2f} s) and TPOT <= {1e3 * cal.get('slo_tpot_s', math.nan):.0f} "
        f"ms ({w.arrival_slo_tpot:g} x its decode step); percentiles linear between order statistics; measured in "
        f"the first {min(w.arrival_repeats, s.repeats)} repeat(s), cells are medians over them"))
    for load, rate in zip(loads, rates, strict=True):
        at_high = load == high
        scenario.comparisons += [
            Comparison(f"{load:g}x load: p50 TTFT vs windowed batch_chat", m("stack", load, "ttft_p50"),
                       m("batch", load, "ttft_p50"), target=Target("<= 0.5x", max_ratio=0.5) if at_high else None),
            Comparison(f"{load:g}x load: p50 TTFT vs sequential chat()", m("stack", load, "ttft_p50"),
                       m("chat", load, "ttft_p50")),
            Comparison(f"{load:g}x load: output tokens/s vs windowed batch_chat", m("stack", load, "throughput"),
                       m("batch", load, "throughput"), higher_is_better=True,
                       target=Target(">= 1.0x", min_ratio=1.0) if at_high else None),
            Comparison(f"{load:g}x load: output tokens/s vs sequential chat()", m("stack", load, "throughput"),
                       m("chat", load, "throughput"), higher_is_better=True),
            Comparison(f"{load:g}x load: goodput vs the offered rate", m("stack", load, "goodput"),
                       _const("offered rate", "req/s", rate), higher_is_better=True, competitive=False,
                       note="every system's goodput is in the percentiles table"),
        ]
    columns = ["system", "load", "rate", *(arrivals.METRICS[k][0] for k in TABLE_METRICS), "worker busy",
               "mean batch", "answers of max_new_tokens"]
    units = ["", "", "req/s", *(arrivals.METRICS[k][1] for k in TABLE_METRICS), "%", "", ""]
    rows = []
    for load, rate in zip(loads, rates, strict=True):
        for system, name in arrivals.SYSTEMS.items():
            runs = e.get(f"s9.runs.{system}.{arrivals.load_key(load)}", [])
            busy = [100 * run["busy_fraction"] for run in runs if run.get("busy_fraction") is not None]
            batch = [run["mean_batch"] for run in runs if "mean_batch" in run]
            full = f"{sum(run['requests_at_max_new_tokens'] for run in runs)}/{sum(run['requests'] for run in runs)}"
            rows.append([name, f"{load:g}x", rate, *(m(system, load, k).median for k in TABLE_METRICS),
                         _median(busy), _median(batch), full])
    scenario.extra = {
        "calibration": cal,
        "tables": [{"title": "Scenario 9, per rate and system (medians over the repeats that measured it)",
                    "columns": columns, "units": units, "rows": rows}],
        "runs": {k: [{key: v for key, v in run.items() if key != "served"} for run in e[k]]
                 for k in e if k.startswith("s9.runs.")},
    }
    return scenario


# The percentiles table's columns (`arrivals.METRICS` keys).
TABLE_METRICS = ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "itl_p50", "itl_p99", "throughput", "goodput",
                 "within_slo")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan
