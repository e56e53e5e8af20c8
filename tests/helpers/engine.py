"""The LLM engine in process: requests as the service takes them, their answers gathered, and a recorder of what every
engine step did."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from services.contract.conversation import Conversation, GenerateRequest, ImageRef, Turn
from services.contract.sampling import SamplingParams
from services.llm.engine.events import Finish, TokenDelta


def ask(text: str, *images: ImageRef, history: Sequence[Turn] = (), adapter: str = "",
        **sampling) -> GenerateRequest:
    """The user turn `images` then `text` after `history`, answered by `adapter` ("": the base) with `sampling`
    (SamplingParams' fields; 8 new tokens unless given). Its embeddings come inline when an image is in it."""
    sampling.setdefault("max_new_tokens", 8)
    inline = bool(images) or any(not isinstance(p, str) for t in history for p in t.user_parts)
    return GenerateRequest(Conversation(user_parts=(*images, text), history=tuple(history), adapter=adapter),
                           SamplingParams(**sampling), inline_embeddings=inline)


@dataclass
class Result:
    """One answer of an engine stream, gathered."""

    token_ids: list[int]
    text: str
    top_logprobs: list
    finish: Finish | None

    @property
    def reason(self) -> str:
        return self.finish.reason.value


async def collect(stream) -> Result:
    """Every event of an engine stream of one answer, gathered."""
    result = Result([], "", [], None)
    async for event in stream:
        if isinstance(event, TokenDelta):
            result.token_ids += event.token_ids
            result.text += event.text
            result.top_logprobs += event.top_logprobs
        else:
            result.finish = event
    return result


async def until(predicate, timeout: float = 20.0) -> None:
    """Until `predicate()` holds, polled on the event loop; AssertionError after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


class Recorder:
    """Wraps the engine's metrics observer and records what every step did."""

    def __init__(self, engine):
        self.inner, self.engine = engine.observer, engine
        self.steps: list[tuple[int, int]] = []  # (decode batch size, prefill tokens) per step
        self.schedules: list[tuple[int, int]] = []  # (steps done, running) at each scheduling point
        engine.observer = self

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def on_step(self, step):
        self.steps.append((step.decode_rows, step.prefill_tokens))
        self.inner.on_step(step)

    def on_schedule(self, load):
        self.schedules.append((load.steps, load.running))
        self.inner.on_schedule(load)
