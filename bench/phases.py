"""The timed runs, in phases; two systems never compute at once (they would slow each other):

1. the repeats: transformers' native model loaded in this process (the baseline: every scenario's baseline side and
   the bare modules) while the stack with one vision and one LLM replica is up (every scenario's side that runs
   through the gateway, scenario 1's cache, 9's arrivals). Within repeat r the two sides of each scenario are taken
   one after the other (`_pairs`): baseline then stack in even repeats, stack then baseline in odd ones, so that a
   drift of the machine over the run (other work, heat, memory) falls on both sides alike and, over an even number
   of repeats, cancels to first order. Whichever side is not computing waits idle: the services have no request,
   this process waits on its gRPC stream. Each repeat is a phase of its own (`--resume` continues after the last
   finished one, with a new stack and a newly loaded baseline);
2. the repeats' stack, still up (the baseline dropped; a new stack after a `--resume`): the scaled pool's sessions
   on one LLM replica and its fetch from a single Redis (no baseline side);
3. the stack with two vision replicas and three LLM replicas (affinity routing): the video scenario again, and the
   scaled pool's sessions;
4. the stack with three LLM replicas under round_robin routing, on a Redis Cluster: the scaled pool's sessions and
   its fetch from the cluster (`pool`).

Not interleaved with a baseline: scenario 5's two-vision-replica video (phase 3, compared with phase 1's one-replica
stack) and scenario 8 (phases 2-4: stack configurations compared with each other).

Each phase records `Measure`s (one sample per repeat; for the scaled pool, one per session or call) under stable keys
in a `Recorder`; `scenarios` turns them into comparisons. Every cold request uses inputs no earlier request of its
stack has seen (`workload.seed`), so the baseline and ours see the very same bytes. Only the parts of the scenarios
in `BenchSettings.scenarios` run.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench import arrivals, pool
from bench import workload as W
from bench.baseline import Baseline, Generation
from bench.machine import RssSampler, decode_bytes_per_step, module_bytes, status_mib
from bench.results import Measure
from bench.settings import BenchSettings
from bench.stack import (
    ChatTiming,
    RunningStack,
    StackStartError,
    chat,
    encode,
    image_part,
    in_threads,
    metric_value,
    text_part,
    video_part,
)
from services.contract import template
from services.model.chat import GenerationParams
from services.model.torch_dtypes import TORCH_DTYPES

log = logging.getLogger("bench")


def wants(s: BenchSettings, *numbers: int) -> bool:
    """Whether any of these scenarios is to be measured."""
    return not s.scenarios.isdisjoint(numbers)


@dataclass
class Recorder:
    measures: dict[str, Measure] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, label: str, unit: str, value: float) -> None:
        self.measures.setdefault(key, Measure(label, unit)).add(value)
        log.info("  %s = %.4g %s", key, value, unit)

    def note(self, key: str, value: Any) -> None:
        self.extra.setdefault(key, []).append(value)

    def load(self, where: str) -> None:
        """The 1-minute load average at this point: other work on the machine skews every figure near it."""
        self.note("load_average_1m", [where, round(os.getloadavg()[0], 2)])

    def save(self, path: Path) -> None:
        """Writes everything recorded so far (atomically), so an interrupted run can `--resume` after its last
        completed phase."""
        doc = {"measures": {k: {"label": m.label, "unit": m.unit, "samples": m.samples}
                            for k, m in self.measures.items()}, "extra": self.extra}
        tmp = path.with_name(path.name + ".part")
        tmp.write_text(json.dumps(doc, default=str))
        tmp.replace(path)

    @classmethod
    def restore(cls, path: Path) -> Recorder:
        doc = json.loads(path.read_text())
        return cls({k: Measure(m["label"], m["unit"], m["samples"]) for k, m in doc["measures"].items()},
                   doc["extra"])


def _preprocess(data: bytes, max_num: int) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    return W.tiles(data, max_num), time.perf_counter() - started


# ------------------------------------------------------------------------------------------------- subjects


class Subjects:
    """The two systems the repeats compare: the in-process baseline and the stack with one vision and one LLM
    replica, each started on first use (so a selection that needs one side only never starts the other) and kept
    until `close()`."""

    def __init__(self, s: BenchSettings, model: str, rec: Recorder):
        self.s, self.model, self.rec = s, model, rec
        self._baseline: Baseline | None = None
        self._stack: RunningStack | None = None
        self.decode_context = 0

    @property
    def baseline(self) -> Baseline:
        if self._baseline is None:
            self._baseline = self._load_baseline()
        return self._baseline

    @property
    def stack(self) -> RunningStack:
        if self._stack is None:
            stack = _start(self.s, self.model, 1, llm_replicas=1, llm_routing="affinity")
            try:
                log.info("stack: ready in %.1fs (logs in %s)", stack.startup_s, stack.log_dir)
                self.rec.extra["stack_startup_s_1_replicas"] = stack.startup_s
                _warm_up(self.s, stack, 1)
                self.rec.extra["stack_rss_mib_warm"] = stack.rss_mib()
            except BaseException:
                stack.stop()
                raise
            self._stack = stack
        return self._stack

    def _load_baseline(self) -> Baseline:
        s, w, rec = self.s, self.s.workload, self.rec
        log.info("baseline: loading transformers' InternVLForConditionalGeneration (%s, %s)", s.dtype, s.device)
        started = time.perf_counter()
        bl = Baseline(self.model, TORCH_DTYPES[s.dtype], s.device)
        rec.extra["baseline_load_s"] = time.perf_counter() - started
        rec.extra["weights"] = {"vision_bytes": module_bytes(bl.vision), "llm_bytes": module_bytes(bl.language_model)}
        decode_prompt = bl.prompt(W.DECODE_PROMPT, None, [])[1]
        self.decode_context = len(bl.tokenizer(decode_prompt).input_ids) + w.decode_new_tokens // 2
        rec.extra["decode_bytes_per_step"] = decode_bytes_per_step(bl.language_model, self.decode_context)
        # Warm-up: kernels, allocator, lazy initialisation (the services warm up at start too).
        warm = W.tiles(W.image_png(W.seed(0, 0), w.concurrency_image_side))
        bl.generate([bl.prompt("Hello", None, [warm.shape[0]])[1]], warm, 2)
        bl.chat.chat(warm, "Hello", GenerationParams(max_new_tokens=2))
        rec.extra["baseline_rss_mib_loaded"] = status_mib(os.getpid())
        return bl

    def drop_baseline(self) -> None:
        if self._baseline is not None:
            self.rec.extra["baseline_rss_mib_peak"] = status_mib(os.getpid(), "VmHWM")
            self._baseline = None
            gc.collect()

    def close(self) -> None:
        """Stops the stack and drops the baseline's model (idempotent)."""
        if self._stack is not None:
            stack, self._stack = self._stack, None
            self.rec.extra["stack_rss_mib_end_1_replicas"] = stack.rss_mib()
            stack.stop()
        self.drop_baseline()


# -------------------------------------------------------------------------------------------------- repeats


def run_repeat(s: BenchSettings, subjects: Subjects, rec: Recorder, r: int) -> None:
    """Repeat r of every interleaved scenario (module doc). The last repeat drops the baseline, and stops the stack
    unless the scaled pool's phase on one replica is to follow in it."""
    log.info("repeat %d/%d (%s first)", r + 1, s.repeats, "stack" if r % 2 else "baseline")
    rec.load(f"repeat {r + 1}")
    for numbers, sides in _pairs(s, subjects, rec, r):
        if not wants(s, *numbers):
            continue
        for side in (reversed(sides) if r % 2 else sides):
            side()
    rec.load(f"repeat {r + 1} end")
    if r == s.repeats - 1:
        subjects.drop_baseline()
        if not wants(s, 8):
            subjects.close()


def _pairs(s: BenchSettings, x: Subjects, rec: Recorder, r: int) -> list[tuple[tuple[int, ...], list]]:
    """The scenarios of repeat r in order: (the scenario numbers that need it, its sides in the order of an even
    repeat, the baseline's first). Scenario 9 is one entry per rate: chat(), windowed batch_chat, the stack."""
    pairs: list[tuple[tuple[int, ...], list]] = [
        ((4,), [lambda: _baseline_overhead(s, x.baseline, rec, r), lambda: _stack_overhead(s, x.stack, rec, r)]),
        # The cache scenario's misses also give the encoder's time per tile (7), beside the bare vision path's.
        ((1, 7), [lambda: wants(s, 7) and _baseline_bare_tile(x.baseline, rec),
                  lambda: _stack_cache(s, x.stack, rec, r)]),
        ((2,), [lambda: _baseline_session(s, x.baseline, rec, r), lambda: _stack_session(s, x.stack, rec, r)]),
        # The concurrency scenario also gives the LLM service's memory with 8 streams (6).
        ((3, 6), [lambda: _baseline_concurrency_side(s, x, rec, r), lambda: _concurrency(s, x.stack, rec, r)]),
        ((5,), [lambda: _baseline_video(s, x.baseline, rec, r), lambda: _video(s, x.stack, rec, 1, r)]),
        ((7,), [lambda: _baseline_bare_decode(s, x, rec), lambda: _stack_decode(s, x.stack, rec, r)]),
    ]
    if r < s.workload.arrival_repeats:
        for i in range(len(s.workload.arrival_loads)):
            pairs.append(((9,), [lambda i=i: arrivals.run_baseline(s, x.baseline, rec, r, i, "chat"),
                                 lambda i=i: arrivals.run_baseline(s, x.baseline, rec, r, i, "batch"),
                                 lambda i=i: arrivals.run_stack(s, x.stack, rec, r, i, lambda: x.baseline)]))
    return pairs


# ------------------------------------------------------------------------------------------- baseline sides


def _baseline_overhead(s: BenchSettings, bl: Baseline, rec: Recorder, r: int) -> None:
    """4. the in-process reference path (the project's InternVLChat, the original chat()) on one cold request."""
    w = s.workload
    log.info("baseline: overhead, repeat %d", r + 1)
    data = W.image_png(W.seed(4, r), w.overhead_image_side)
    started = time.perf_counter()
    pixels = W.tiles(data)
    bl.chat.chat(pixels, W.QUESTIONS[0], GenerationParams(max_new_tokens=w.overhead_new_tokens))
    rec.add("s4.reference", "in-process chat() end to end", "s", time.perf_counter() - started)


def _baseline_session(s: BenchSettings, bl: Baseline, rec: Recorder, r: int) -> None:
    """2. chat() with history: every turn re-encodes the image and prefills the whole conversation."""
    w = s.workload
    log.info("baseline: multi-round, repeat %d", r + 1)
    data = W.image_png(W.seed(2, r), w.session_image_side)
    pixels, pre_s = _preprocess(data, w.session_max_num)
    history = None
    for turn, question in enumerate(W.QUESTIONS, start=1):
        generation, history = bl.chat_turn(pixels, question, history, w.turn_new_tokens)
        rec.add(f"s2.baseline.turn{turn}", f"chat() turn {turn} TTFT", "s",
                generation.ttft_s + (pre_s if turn == 1 else 0.0))


def _baseline_video(s: BenchSettings, bl: Baseline, rec: Recorder, r: int) -> None:
    """5. a 16-frame video through chat(): decode, sample, tile, encode every frame, prefill, answer."""
    w = s.workload
    log.info("baseline: video, repeat %d", r + 1)
    data = W.video_mp4(W.seed(5, r), w.video_frames, w.frame_side)
    started = time.perf_counter()
    frames = W.video_tiles(data, w.video_frames)
    prompt = bl.prompt(template.video_prefix(w.video_frames) + W.VIDEO_QUESTION, None, [1] * w.video_frames)[1]
    bl.generate([prompt], frames, w.video_new_tokens)
    rec.add("s5.baseline", "chat() on the video, end to end", "s", time.perf_counter() - started)


def _baseline_bare_tile(bl: Baseline, rec: Recorder) -> None:
    """7. the bare vision path, without any serving code around it."""
    rec.add("s7.bare_tile", "bare vision path, per tile (5-tile forward)", "s", bl.bare_tile_s(5))


def _baseline_bare_decode(s: BenchSettings, x: Subjects, rec: Recorder) -> None:
    """7. the bare language model's decode step, without any serving code around it."""
    bl = x.baseline
    steps = bl.bare_decode_step_s(x.decode_context, max(4, s.workload.decode_new_tokens // 2))
    rec.add("s7.bare_decode", "bare language-model decode step", "s", statistics.median(steps))


def _baseline_concurrency_side(s: BenchSettings, x: Subjects, rec: Recorder, r: int) -> None:
    if wants(s, 3):
        _baseline_concurrency(s, x.baseline, rec, r)
    else:  # 6 alone: the baseline process's memory and the weights' size, recorded when it loads
        _ = x.baseline


def _baseline_concurrency(s: BenchSettings, bl: Baseline, rec: Recorder, r: int) -> None:
    """3. eight requests: one after another, then as one padded batch_chat."""
    w = s.workload
    log.info("baseline: concurrency, repeat %d", r + 1)
    images = [W.image_png(W.seed(3, r, i), w.concurrency_image_side) for i in range(w.concurrency)]
    started = time.perf_counter()
    runs: list[Generation] = []
    for data in images:
        pixels = W.tiles(data)
        runs.append(bl.chat_turn(pixels, W.QUESTIONS[0], None, w.concurrency_new_tokens)[0])
    wall = time.perf_counter() - started
    tokens = sum(g.tokens for g in runs)
    rec.add("s3.sequential", "sequential chat() tokens/s", "tok/s", tokens / wall)
    decode_s = sum(g.decode_s for g in runs)
    if decode_s > 0:
        rec.add("s3.sequential.decode", "sequential chat() decode-phase tokens/s", "tok/s",
                sum(g.tokens - 1 for g in runs) / decode_s)
    started = time.perf_counter()
    batch = bl.batch_chat([W.tiles(d) for d in images], [W.QUESTIONS[0]] * len(images), w.concurrency_new_tokens)
    wall = time.perf_counter() - started
    rec.add("s3.batch_chat", "batch_chat tokens/s", "tok/s", batch.tokens / wall)
    if batch.decode_s > 0:
        rec.add("s3.batch_chat.decode", "batch_chat decode-phase tokens/s", "tok/s",
                (batch.tokens - len(images)) / batch.decode_s)
    rec.note("s3.tokens_per_request.baseline", [len(g.ids[0]) for g in runs])


# ---------------------------------------------------------------------------------------------- stack sides


def _start(s: BenchSettings, model: str, replicas: int, **options: Any) -> RunningStack:
    """`internvl-serve up` with `replicas` vision replicas and `options` (RunningStack's), tried twice."""
    log.info("stack: starting `internvl-serve up --vision-replicas %d` %s (%s)", replicas, options or "", s.dtype)
    try:
        return RunningStack(model, s.dtype, replicas, startup_timeout_s=s.startup_timeout_s, **options)
    except StackStartError as exc:
        # `up` picks free ports by binding and releasing them; another process may take one in between.
        log.warning("stack did not start, trying once more: %s", str(exc)[-500:])
        return RunningStack(model, s.dtype, replicas, startup_timeout_s=s.startup_timeout_s, **options)


def _warm_up(s: BenchSettings, stack: RunningStack, seed: int) -> None:
    """A request through every hop (one tile encoded, a short prefill and decode), as the baseline's warm-up; one
    per LLM replica, each about its own image (each replica also warms itself up before it reports SERVING)."""
    for i in range(stack.llm_replicas):
        chat(stack.chat, [image_part(W.image_png(W.seed(0, 1 + i, seed), s.workload.concurrency_image_side)),
                          text_part("Hello")], 2)


def run_one_replica(s: BenchSettings, subjects: Subjects, rec: Recorder, cached: pool.CachedValues) -> None:
    """Phase 2: the scaled pool on one LLM replica and its fetch from a single Redis, in the repeats' stack (a new
    one after a `--resume`); then that stack is stopped."""
    try:
        pool.run_sessions(s, subjects.stack, rec, "1", "1 LLM replica", cached)
        pool.run_fetch(s, subjects.stack, rec, "single", "single Redis", cached)
    finally:
        subjects.close()


def run_stack(s: BenchSettings, model: str, rec: Recorder, replicas: int,
              cached: pool.CachedValues | None = None) -> None:
    """Phase 3: the video on `replicas` vision replicas and the scaled pool's LLM replicas with affinity routing."""
    w = s.workload
    cached = cached or pool.CachedValues()
    with _start(s, model, replicas, llm_replicas=w.pool_replicas, llm_routing="affinity") as stack:
        log.info("stack: ready in %.1fs (logs in %s)", stack.startup_s, stack.log_dir)
        rec.extra[f"stack_startup_s_{replicas}_replicas"] = stack.startup_s
        _warm_up(s, stack, replicas)
        if wants(s, 5):
            for r in range(s.repeats):
                _video(s, stack, rec, replicas, r)
        if wants(s, 8):
            pool.run_sessions(s, stack, rec, "affinity", f"{w.pool_replicas} LLM replicas, affinity", cached)
        rec.extra[f"stack_rss_mib_end_{replicas}_replicas"] = stack.rss_mib()


def run_round_robin(s: BenchSettings, model: str, rec: Recorder, cached: pool.CachedValues | None = None) -> None:
    """Phase 4: the scaled pool's LLM replicas under round_robin routing, on a Redis Cluster."""
    w = s.workload
    cached = cached or pool.CachedValues()
    with _start(s, model, 1, llm_replicas=w.pool_replicas, llm_routing="round_robin",
                redis_cluster=w.pool_redis_masters) as stack:
        log.info("stack: ready in %.1fs (logs in %s)", stack.startup_s, stack.log_dir)
        rec.extra["stack_startup_s_round_robin"] = stack.startup_s
        _warm_up(s, stack, 3)
        pool.run_sessions(s, stack, rec, "round_robin", f"{w.pool_replicas} LLM replicas, round_robin", cached)
        pool.run_fetch(s, stack, rec, "cluster", f"Redis Cluster of {w.pool_redis_masters} masters", cached)


def _stack_overhead(s: BenchSettings, stack: RunningStack, rec: Recorder, r: int) -> None:
    w = s.workload
    log.info("stack: overhead, repeat %d", r + 1)
    data = W.image_png(W.seed(4, r), w.overhead_image_side)
    t = chat(stack.chat, [image_part(data), text_part(W.QUESTIONS[0])], w.overhead_new_tokens)
    rec.add("s4.ours", "gateway end to end", "s", t.total_s)
    rec.note("s4.usage", t.usage)


def _stack_cache(s: BenchSettings, stack: RunningStack, rec: Recorder, r: int) -> None:
    w = s.workload
    log.info("stack: cache, repeat %d", r + 1)
    vision = stack.vision_stub(0)
    data = W.image_png(W.seed(1, r), w.cache_image_side)
    before = stack.metrics("vision-0")
    miss_s, items = encode(vision, data, w.cache_max_num)
    after = stack.metrics("vision-0")
    if items[0].cache_hit:
        raise RuntimeError("the cache scenario's first Encode was a hit; its image is not new")
    rec.add("s1.miss", "Encode, cache miss", "s", miss_s)
    hits = [encode(vision, data, w.cache_max_num) for _ in range(w.hit_calls)]
    if not all(items[0].cache_hit for _, items in hits):
        raise RuntimeError("a repeated Encode of the same image missed the cache")
    rec.add("s1.hit", "Encode, cache hit", "s", statistics.median(h for h, _ in hits))
    tiles = (metric_value(after, "internvl_vision_tiles_encoded_total")
             - metric_value(before, "internvl_vision_tiles_encoded_total"))
    seconds = (metric_value(after, "internvl_vision_encode_seconds_sum")
               - metric_value(before, "internvl_vision_encode_seconds_sum"))
    rec.note("s1.tiles", items[0].num_tiles)
    if tiles:
        rec.add("s7.service_tile", "vision service encoder forward, per tile", "s", seconds / tiles)


def _stack_session(s: BenchSettings, stack: RunningStack, rec: Recorder, r: int) -> None:
    w = s.workload
    log.info("stack: multi-round, repeat %d", r + 1)
    data = W.image_png(W.seed(2, r), w.session_image_side)
    session = None
    for turn, question in enumerate(W.QUESTIONS, start=1):
        content = [image_part(data), text_part(question)] if turn == 1 else [text_part(question)]
        t = chat(stack.chat, content, w.turn_new_tokens, session_id=session, max_num=w.session_max_num)
        session = t.session_id
        rec.add(f"s2.ours.turn{turn}", f"session turn {turn} TTFT", "s", t.ttft_s)
        rec.note(f"s2.usage.turn{turn}", t.usage)


def _stack_decode(s: BenchSettings, stack: RunningStack, rec: Recorder, r: int) -> None:
    log.info("stack: single-stream decode, repeat %d", r + 1)
    t = chat(stack.chat, [text_part(f"{W.DECODE_PROMPT} ({r})")], s.workload.decode_new_tokens)
    rec.add("s7.service_decode", "single-stream decode step through the gateway", "s", t.decode_step_s())
    rec.note("s7.decode_tokens", t.tokens)


def _concurrency(s: BenchSettings, stack: RunningStack, rec: Recorder, r: int) -> None:
    w = s.workload
    log.info("stack: concurrency, repeat %d", r + 1)
    images = [W.image_png(W.seed(3, r, i), w.concurrency_image_side) for i in range(w.concurrency)]
    barrier = threading.Barrier(w.concurrency)

    def one(i: int) -> ChatTiming:
        barrier.wait()
        return chat(stack.chat, [image_part(images[i]), text_part(W.QUESTIONS[0])], w.concurrency_new_tokens)

    with RssSampler({"llm": stack.pids["llm"]}) as sampler:
        timings = in_threads(one, w.concurrency)
    start = min(t.started for t in timings)
    wall = max(t.finished for t in timings) - start
    tokens = sum(t.tokens for t in timings)
    rec.add("s3.ours", f"{w.concurrency} concurrent streams tokens/s", "tok/s", tokens / wall)
    rec.add("s6.llm_streams", f"LLM service peak RSS with {w.concurrency} streams", "MiB", sampler.peak["llm"])
    # Decode phase: tokens after each stream's first delta, over the time during which any stream was decoding
    # (the union of the streams' [first token, finish] intervals), comparable to the baseline's decode phases.
    decoded = sum(n for t in timings for _, n in t.deltas[1:])
    busy = _union_length([(t.deltas[0][0], t.deltas[-1][0]) for t in timings if t.deltas])
    if busy > 0:
        rec.add("s3.ours.decode", "concurrent decode-phase tokens/s", "tok/s", decoded / busy)
    rec.note("s3.tokens_per_request.ours", [t.tokens for t in timings])
    rec.note("s3.ttft_s.ours", [t.ttft_s for t in timings])


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _video(s: BenchSettings, stack: RunningStack, rec: Recorder, replicas: int, r: int) -> None:
    w = s.workload
    log.info("stack: video with %d vision replica(s), repeat %d/%d", replicas, r + 1, s.repeats)
    rec.load(f"stack video {replicas} replica(s) repeat {r + 1}")
    data = W.video_mp4(W.seed(5, r), w.video_frames, w.frame_side)
    content = [video_part(data, w.video_frames), text_part(W.VIDEO_QUESTION)]
    cold = chat(stack.chat, content, w.video_new_tokens)
    rec.add(f"s5.cold.{replicas}", f"video cold, {replicas} vision replica(s)", "s", cold.total_s)
    cached = chat(stack.chat, content, w.video_new_tokens)
    rec.add(f"s5.cached.{replicas}", f"video again (frames cached), {replicas} replica(s)", "s",
            cached.total_s)
    rec.note(f"s5.usage.cold.{replicas}", cold.usage)
    rec.note(f"s5.usage.cached.{replicas}", cached.usage)
