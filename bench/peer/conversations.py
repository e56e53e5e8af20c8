"""Scenarios 11-14 of the peer benchmark, on one side at a time (`sides.Side`), recorded under
`s<N>.<side>[.<mode>].<what>`.

- 11 / 13, conversations: sessions of three turns about an image of their own, one session at a time (11 on one
  replica, 13 on three). `vllm serve` is stateless: every turn resends the conversation so far, the image as its data
  URL, the answers as the client received them (`history` mode). Ours runs both ways: `session` (a later turn sends
  its question and the session id; the gateway keeps the history and the image's cache key) and `history` (exactly
  the stateless requests `vllm serve` gets);
- 12, the same image in a new conversation: an image's first conversation, then conversations about other images
  (enough image tokens to push it out of vLLM's encoder cache: see `Workload.peer_between`), then the image again in
  a new conversation whose prefix differs before the image: another system prompt, or a question and answer before
  it. On three replicas behind round robin, each of these lands on another `vllm serve` replica than the last;
- 14, decode: `concurrency` text-only streams released together, `peer_decode_tokens` each.
"""

from __future__ import annotations

import logging
import threading
import time

from bench import workload as W
from bench.peer import stages
from bench.peer.openai_stream import StreamTiming, image_url_part, stream_chat, text_part
from bench.peer.sides import Side
from bench.phases import Recorder, _union_length
from bench.settings import BenchSettings
from bench.stack import in_threads, metric_value

log = logging.getLogger("bench")

ANOTHER_SYSTEM = "You are a careful assistant who describes pictures for people who cannot see them."
BEFORE_IT = ({"role": "user", "content": "I will show you a picture I took last summer."},
             {"role": "assistant", "content": "Please share it; I will describe what I see."})
RETURN_QUESTION = "What is in this picture?"
MODE_SEED_OFFSET = {"history": 0, "session": 100}
COUNT_SETTLE_S = 10.0


def measured(side: Side, messages: list[dict], tokens: int, **extra) -> tuple[StreamTiming, dict]:
    """One request, with the servers' own account of where its time went (`stages`)."""
    before = stages.snapshot(side)
    t = stream_chat(side.endpoint, messages, tokens, **extra)
    return t, {"ttft_s": t.ttft_s, "prompt_tokens": t.usage.get("prompt_tokens"),
               "cached_prompt_tokens": t.cached_prompt_tokens, "completion_tokens": t.usage.get("completion_tokens"),
               **stages.delta(before, stages.snapshot(side))}


def conversation(side: Side, image: bytes, questions: tuple[str, ...], tokens: int,
                 mode: str) -> list[tuple[StreamTiming, dict]]:
    """One conversation's turns, back to back, each with its account; `mode` "session" (ours only) or "history"
    (module doc)."""
    history: list[dict] = []
    session = ""
    turns = []
    for turn, question in enumerate(questions):
        user = {"role": "user", "content": [image_url_part(image), text_part(question)] if turn == 0 else question}
        if mode == "session" and turn > 0:
            t, account = measured(side, [user], tokens, session_id=session)
        else:
            t, account = measured(side, [*history, user], tokens)
        history += [user, {"role": "assistant", "content": t.text}]
        session = t.session_id
        turns.append((t, account))
    return turns


def run_conversations(s: BenchSettings, side: Side, rec: Recorder, number: int, r: int, sessions: int,
                      mode: str) -> None:
    """Scenario `number` (11 or 13): `sessions` conversations one at a time, recorded per turn (one sample per
    session) under `s<number>.<side>.<mode>.turn<t>`."""
    w = s.workload
    key = f"s{number}.{side.name}.{mode}"
    log.info("peer %d: %s, %d conversation(s), %s, repeat %d", number, side.label, sessions, mode, r + 1)
    for i in range(sessions):
        # Each mode its own images: ours runs both modes on the same stack, whose caches must not help the second.
        image = W.image_png(W.seed(number, r, i + MODE_SEED_OFFSET[mode]), w.peer_image_side)
        served_before = len(side.proxy.served) if side.proxy else 0
        turns = conversation(side, image, W.QUESTIONS, w.peer_turn_tokens, mode)
        for turn, (t, _) in enumerate(turns, start=1):
            rec.add(f"{key}.turn{turn}", f"{side.label}, {mode}, turn {turn} TTFT", "s", t.ttft_s)
        rec.note(f"{key}.usage", [account for _, account in turns])
        if side.proxy:
            rec.note(f"{key}.replicas", side.proxy.served[served_before:])


def run_returning_image(s: BenchSettings, side: Side, rec: Recorder, where: str, r: int, between: int) -> None:
    """Scenario 12 on one side: the image's first conversation, `between` others, the image after another system
    prompt, `between` others, the image after a question; recorded under `s12.<side>.<where>.<variant>`."""
    w = s.workload
    key = f"s12.{side.name}.{where}"
    log.info("peer 12: %s, %s, repeat %d", side.label, where, r + 1)
    image = W.image_png(W.seed(12, r), w.peer_image_side)
    others = iter(W.image_png(W.seed(12, r, 1 + i), w.peer_image_side) for i in range(2 * between))
    counts = _generate_counts(side)
    first, account = measured(side, [{"role": "user", "content": [image_url_part(image),
                                                                   text_part(W.QUESTIONS[0])]}],
                              w.peer_return_tokens)
    rec.add(f"{key}.first", f"{side.label}: the image's first conversation TTFT", "s", first.ttft_s)
    where_served = {"first": _served_by(side, counts)}
    accounts = {"first": account}
    variants = {
        "system": [{"role": "system", "content": ANOTHER_SYSTEM}],
        "question": list(BEFORE_IT),
    }
    for variant, before in variants.items():
        for _ in range(between):
            stream_chat(side.endpoint, [{"role": "user", "content": [image_url_part(next(others)),
                                                                      text_part(W.QUESTIONS[1])]}], 2)
        counts = _generate_counts(side)
        t, accounts[variant] = measured(side, [*before, {"role": "user", "content": [
            image_url_part(image), text_part(RETURN_QUESTION)]}], w.peer_return_tokens)
        rec.add(f"{key}.{variant}", f"{side.label}: the image again, new conversation ({variant} before it) TTFT",
                "s", t.ttft_s)
        where_served[variant] = _served_by(side, counts)
    rec.note(f"{key}.usage", accounts)
    rec.note(f"{key}.replica", where_served)


def _generate_counts(side: Side) -> dict[str, float]:
    """Each LLM replica's completed Generate calls so far (ours), or how many requests the proxy has sent."""
    if side.stack is not None:
        return {name: metric_value(side.stack.metrics(name), "internvl_llm_requests_total", method="Generate")
                for name in side.stack.llm_names}
    return {"proxy": float(len(side.proxy.served)) if side.proxy else 0.0}


def _served_by(side: Side, before: dict[str, float]) -> str:
    """Which replica served the one request since `before` (ours: by the replicas' counters; `vllm serve`: the
    proxy's record); "" with one replica."""
    if side.replicas == 1:
        return ""
    if side.proxy is not None:
        return f"vllm-serve-{side.proxy.served[-1]}"
    # A replica counts a Generate call when its stream closes, just after the client has the last message.
    deadline = time.monotonic() + COUNT_SETTLE_S
    while True:
        after = _generate_counts(side)
        grown = [name for name in after if after[name] > before.get(name, 0.0)]
        if grown or time.monotonic() > deadline:
            return ",".join(grown)
        time.sleep(0.1)


def run_decode(s: BenchSettings, side: Side, rec: Recorder, r: int) -> None:
    """Scenario 14 on one side: `concurrency` text streams at once; aggregate and decode-phase tokens/s."""
    w = s.workload
    log.info("peer 14: %s, %d streams, repeat %d", side.label, w.concurrency, r + 1)
    barrier = threading.Barrier(w.concurrency)

    def one(i: int) -> StreamTiming:
        barrier.wait()
        return stream_chat(side.endpoint, [{"role": "user", "content": f"{W.DECODE_PROMPT} ({r}, {i})"}],
                           w.peer_decode_tokens)

    timings = in_threads(one, w.concurrency)
    start = min(t.started for t in timings)
    wall = max(t.finished for t in timings) - start
    tokens = sum(t.tokens for t in timings)
    key = f"s14.{side.name}"
    rec.add(f"{key}.tokens_per_s", f"{side.label}: {w.concurrency} streams tokens/s", "tok/s", tokens / wall)
    decoded = sum(n for t in timings for _, n in t.deltas[1:])
    busy = _union_length([(t.deltas[0][0], t.deltas[-1][0]) for t in timings if t.deltas])
    if busy > 0:
        rec.add(f"{key}.decode_per_s", f"{side.label}: {w.concurrency}-stream decode-phase tokens/s", "tok/s",
                decoded / busy)
    rec.note(f"{key}.tokens", [t.tokens for t in timings])
    rec.note(f"{key}.ttft_s", [t.ttft_s for t in timings])
