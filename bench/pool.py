"""Scenario 8, the scaled pool: sessions of three turns about an image, on one or several LLM replicas.

`run_sessions` measures one configuration inside a running stack, in two passes over sessions of their own images:

- one at a time: each session's three turns back to back, then the next session. Nothing else runs, so a turn's
  time to first token is its prefill (of the new turn only, on a prefix hit; of the whole conversation on a miss)
  and not a queue behind other sessions: the pass the latency targets are read from;
- all at once: every session a concurrent client running its turns back to back (a closed loop), all released
  together, so their first turns reach the LLM pool as one burst. This is what the load bound of affinity routing
  is for: the pass that says how evenly sessions spread and how many later turns keep their prefix under load.

Before the passes every session image's embeddings are put in the stack's cache: copied from an earlier stack's
Redis when this process has their values (`CachedValues`), else encoded through the vision service. So every
configuration starts with the same embeddings cached and its LLM prefix caches empty, and no turn waits on the
encoder. Each LLM replica's count of completed Generate calls (`internvl_llm_requests_total`, recorded when a stream
closes, just after the client has its last message, so polled briefly) is read around the burst.

A later turn is a prefix hit when the LLM found the whole previous turn's prompt in its prefix cache
(`cached_prompt_tokens` >= the previous turn's `prompt_tokens`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bench import workload as W
from bench.settings import BenchSettings
from bench.stack import (
    ChatTiming,
    RunningStack,
    chat,
    encode,
    fetch_embeddings,
    image_part,
    in_threads,
    lookup,
    metric_value,
    redis_client,
    text_part,
)

if TYPE_CHECKING:  # phases runs this module's measurements, so it cannot be imported from here at run time
    from bench.phases import Recorder

log = logging.getLogger("bench")

TURNS = len(W.QUESTIONS)
GENERATE_COUNT = "internvl_llm_requests_total"
ROUTING_DECISIONS = "internvl_gateway_routing_decisions_total"
# How long the replicas' request counters may take to count the last streams.
COUNT_SETTLE_S = 10.0
ENCODE_ITEMS_PER_CALL = 4


@dataclass
class CachedValues:
    """The session images' cache keys and raw Redis values, kept by this process from the first stack that encoded
    them, so that later stacks get them copied into their own (empty) Redis instead of encoding them again."""

    keys: list[str] = field(default_factory=list)
    values: dict[str, bytes] = field(default_factory=dict)


PASSES = ("sequential", "concurrent")


def session_images(s: BenchSettings) -> dict[str, list[bytes]]:
    """Each pass's images, one per session, the same in every configuration (seed namespace 8)."""
    w = s.workload
    return {name: [W.image_png(W.seed(8, p, i), w.pool_image_side) for i in range(w.pool_sessions)]
            for p, name in enumerate(PASSES)}


def ensure_cached(s: BenchSettings, stack: RunningStack, images: list[bytes], cached: CachedValues) -> str:
    """Puts the images' embeddings in the stack's cache; says how ("copied" or "encoded")."""
    vision = stack.vision_stub(0)
    if cached.keys and len(cached.values) == len(cached.keys) and stack.redis_url:
        with contextlib.closing(redis_client(stack.redis_url)) as client:
            for key in cached.keys:
                client.set(key, cached.values[key])
        if all(lookup(vision, cached.keys)):
            return "copied"
    started, items = time.perf_counter(), []
    # A few images per call, as the gateway sends them: one call of all of them could exceed the message limit.
    for first in range(0, len(images), ENCODE_ITEMS_PER_CALL):
        items += encode(vision, images[first:first + ENCODE_ITEMS_PER_CALL], s.workload.pool_max_num,
                        use_thumbnail=True)[1]
    log.info("  encoded %d session images (%d tiles) in %.1fs", len(items), sum(i.num_tiles for i in items),
             time.perf_counter() - started)
    cached.keys = [item.key for item in items]
    if stack.redis_url:
        with contextlib.closing(redis_client(stack.redis_url)) as client:
            values = [client.get(key) for key in cached.keys]
        cached.values = {k: v for k, v in zip(cached.keys, values, strict=True) if v is not None}
    return "encoded"


def prefix_hits(usages: list[dict]) -> tuple[int, int]:
    """(hits, later turns) of one session's turns in order: turn t > 1 is a hit when its cached prompt tokens cover
    turn t - 1's whole prompt."""
    pairs = list(itertools.pairwise(usages))
    hits = sum(later["cached_prompt_tokens"] >= earlier["prompt_tokens"] for earlier, later in pairs)
    return hits, len(pairs)


def balance_bound(sessions: int, replicas: int, epsilon: float) -> float:
    """The most sessions one replica should carry: (1 + epsilon) x the mean, plus one for rounding a session."""
    return (1 + epsilon) * sessions / replicas + 1


def _generate_counts(stack: RunningStack) -> dict[str, float]:
    return {name: metric_value(stack.metrics(name), GENERATE_COUNT, method="Generate", code="OK")
            for name in stack.llm_names}


def _decisions(stack: RunningStack) -> dict[str, float]:
    text = stack.metrics("gateway")
    return {reason: metric_value(text, ROUTING_DECISIONS, pool="llm", reason=reason)
            for reason in ("affinity", "overload", "failover", "round_robin")}


def _session(stack: RunningStack, image: bytes, new_tokens: int, max_num: int) -> list[ChatTiming]:
    """One session's three turns, back to back; the first sends the image, the later ones continue the session."""
    turns: list[ChatTiming] = []
    session = None
    for turn, question in enumerate(W.QUESTIONS, start=1):
        content = [image_part(image), text_part(question)] if turn == 1 else [text_part(question)]
        t = chat(stack.chat, content, new_tokens, session_id=session, max_num=max_num)
        session = t.session_id
        turns.append(t)
    return turns


def _closed_loop(stack: RunningStack, images: list[bytes], new_tokens: int, max_num: int) -> list[list[ChatTiming]]:
    """Each image's session in its own thread, all released together; the turns' timings."""
    barrier = threading.Barrier(len(images))

    def client(i: int) -> list[ChatTiming]:
        barrier.wait()
        return _session(stack, images[i], new_tokens, max_num)

    turns = in_threads(client, len(images))
    return turns


def _settled_counts(stack: RunningStack, before: dict[str, float], expected: int) -> dict[str, float]:
    """The replicas' Generate counts once they have grown by `expected` calls (or after COUNT_SETTLE_S)."""
    deadline = time.monotonic() + COUNT_SETTLE_S
    while True:
        after = _generate_counts(stack)
        if sum(after.values()) - sum(before.values()) >= expected or time.monotonic() > deadline:
            return after
        time.sleep(0.1)


def _record_turns(rec: Recorder, key: str, label: str, turns: list[list[ChatTiming]]) -> None:
    for session in turns:
        for turn, t in enumerate(session, start=1):
            rec.add(f"{key}.turn{turn}", f"turn {turn} TTFT, {label}", "s", t.ttft_s)
    hits, later = map(sum, zip(*(prefix_hits([t.usage for t in session]) for session in turns), strict=True))
    rec.add(f"{key}.hit_rate", f"later turns with a prefix hit, {label}", "%", 100.0 * hits / later)
    rec.note(f"{key}.usage", [[t.usage for t in session] for session in turns])


def run_sessions(s: BenchSettings, stack: RunningStack, rec: Recorder, config: str, label: str,
                 cached: CachedValues) -> None:
    """One configuration's two passes (`config`: 1, affinity or round_robin), recorded under
    `s8.<config>.<pass>.*`."""
    w = s.workload
    images = session_images(s)
    how = ensure_cached(s, stack, [i for name in PASSES for i in images[name]], cached)
    rec.note(f"s8.{config}.embeddings", how)

    log.info("stack: scaled pool, %s: %d sessions one at a time (embeddings %s)", label, w.pool_sessions, how)
    rec.load(f"scaled pool {label}, one at a time")
    decisions_before = _decisions(stack)
    turns = [_session(stack, image, w.pool_new_tokens, w.pool_max_num) for image in images["sequential"]]
    _record_turns(rec, f"s8.{config}.sequential", f"{label}, one at a time", turns)
    rec.note(f"s8.{config}.sequential.routing_decisions",
             {k: v - decisions_before[k] for k, v in _decisions(stack).items()})

    log.info("stack: scaled pool, %s: %d sessions at once", label, w.pool_sessions)
    rec.load(f"scaled pool {label}, at once")
    before, decisions_before = _generate_counts(stack), _decisions(stack)
    turns = _closed_loop(stack, images["concurrent"], w.pool_new_tokens, w.pool_max_num)
    after = _settled_counts(stack, before, w.pool_sessions * TURNS)
    _record_turns(rec, f"s8.{config}.concurrent", f"{label}, all at once", turns)
    sessions = {name: (after[name] - before[name]) / TURNS for name in stack.llm_names}
    rec.add(f"s8.{config}.concurrent.max_sessions", f"most sessions on one replica, {label}, all at once",
            "sessions", max(sessions.values()))
    rec.note(f"s8.{config}.concurrent.sessions_per_replica", sessions)
    rec.note(f"s8.{config}.concurrent.routing_decisions",
             {k: v - decisions_before[k] for k, v in _decisions(stack).items()})


def run_fetch(s: BenchSettings, stack: RunningStack, rec: Recorder, backend: str, label: str,
              cached: CachedValues) -> None:
    """`fetch_calls` FetchEmbeddings of the first session image through vision-0, recorded under
    `s8.fetch.<backend>` (one sample per call)."""
    images = session_images(s)
    ensure_cached(s, stack, [i for name in PASSES for i in images[name]], cached)
    vision = stack.vision_stub(0)
    key = cached.keys[0]
    # Untimed first call: the channel and the service's Redis connections are open before timing.
    _, size = fetch_embeddings(vision, key)
    for _ in range(s.workload.fetch_calls):
        seconds, size = fetch_embeddings(vision, key)
        rec.add(f"s8.fetch.{backend}", f"FetchEmbeddings of one image, {label}", "s", seconds)
    rec.extra["s8.fetch.bytes"] = size
