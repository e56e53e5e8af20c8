"""The seam between the LLM service and whatever generates tokens: what an engine takes, gives and reports.

`LLMService`, the metrics and the servicer depend on this module (and `events`) only; the service gets its engine
from `services.llm.engine.factory`, which builds the one `LLMConfig.engine` names. The transformers engine
(`services.llm.engine.transformers_engine.TransformersEngine`) is the first implementation; an engine for GPU pools
(vLLM with `enable_mm_embeds`, fed the image rows as embeddings and the image keys as `multi_modal_uuids` so its prefix
cache keys match ours) goes beside it and must provide the same:

- `submit(request)` from the event loop's thread, returning a `GenerationStream` at once (raising `OverloadedError`
  when the request could never fit its memory), whose events are `TokenDelta`s and one `Finish` per answer
  (`sampling.n` answers, prefilled once, answer i sampled as a single request with `sampling.for_answer(i)`), or an
  exception (a domain error from `services.contract.errors`) instead. The service has refused what it does not take
  before (services.llm.intake: an adapter it does not serve, a full queue), so an engine checks neither;
- constrained decoding: a row with `request.grammar` samples only tokens the grammar allows;
- the original's semantics for every sampling option (those of `generate(inputs_embeds=...)`: the repetition penalty
  sees only generated tokens), text deltas whose concatenation is the decoded answer cut before a stop string;
- `cancel` (through `GenerationStream.cancel`) freeing the request's memory within one step;
- faults confined to the requests they hit, with `BatchFaultError` (UNAVAILABLE, retryable before the first token)
  for requests lost to a fault of the shared batch;
- `load()`: the figures metrics read, and `waiting`, which the service's queue bound counts;
- `readiness`, when set, told False when the engine cannot take requests for a while (it lost its workers and
  restarts them; `submit` raises NotReadyError meanwhile) and True when it takes them again. An engine that never
  stops serving after a fault never calls it.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from services.contract.errors import NotReadyError
from services.llm.engine.events import EngineRequest, Event, Finish


class BatchFaultError(NotReadyError):
    """The request was in a batch whose state a fault corrupted; the engine rebuilt its batch and serves on."""


@dataclass(frozen=True)
class EngineLoad:
    """A snapshot of an engine's occupancy. Counters (`steps`, `prefix_*`) only grow."""

    running: int  # sequences decoding or prefilling
    waiting: int  # submitted, not yet admitted
    kv_bytes: int  # memory holding running sequences' KV now
    kv_reserved_bytes: int  # what admission has promised to running sequences (prompt + max_new_tokens each)
    kv_budget_bytes: int  # admission's limit on kv_reserved_bytes
    prefix_bytes: int = 0  # finished turns' KV kept for reuse
    prefix_budget_bytes: int = 0
    prefix_lookups: int = 0
    prefix_hits: int = 0
    steps: int = 0


@dataclass(frozen=True)
class StepReport:
    """What one scheduler step computed."""

    decode_rows: int  # sequences in the step's decode forward (0: none)
    prefill_rows: int  # prompts in the step's prefill forward (0: none)
    prefill_tokens: int  # prompt tokens that forward fed (padding excluded)


class EngineObserver:
    """Hooks an engine calls on the event loop's thread (services.llm.metrics.LLMMetrics implements them)."""

    def on_step(self, step: StepReport) -> None: ...

    def on_tokens(self, timed: list, now: float) -> None:
        """`timed`: (arrival, previous token time or None, TokenDelta, adapter) for each delta delivered at `now`;
        `adapter` is the LoRA adapter's name, "" for the base."""

    def on_finish(self, reason: str, prompt_tokens: int, cached_prompt_tokens: int, adapter: str = "") -> None: ...

    def on_schedule(self, load: EngineLoad) -> None: ...


class GenerationStream:
    """The events of one request: TokenDelta..., and one Finish per answer (`sampling.n` of them, told apart by
    `index`), or an exception instead. `cancel()` frees its slots."""

    def __init__(self, queue: asyncio.Queue, cancel: Callable[[], None], answers: int = 1):
        self._queue = queue
        self._cancel = cancel
        self._open = answers
        self._done = False

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if isinstance(item, Finish):
            self._open -= 1
            self._done = self._open == 0
        return item

    def cancel(self) -> None:
        self._cancel()


class Engine(abc.ABC):
    """Create, `await start()`, `submit()` from the event loop's thread, `await close()`."""

    observer: EngineObserver | None = None
    # Called on the event loop's thread with False when the engine stops taking requests after a fault and with True
    # when it takes them again (the server's readiness follows it); None: nobody listens.
    readiness: Callable[[bool], None] | None = None
    # The compute dtype (a torch.dtype), which GetModelInfo reports.
    dtype: object

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None:
        """Stops; every unfinished stream ends with FINISH_REASON_CANCELLED."""

    @abc.abstractmethod
    def submit(self, request: EngineRequest) -> GenerationStream:
        """Queues `request`; raises OverloadedError when the request can never fit memory."""

    @abc.abstractmethod
    def load(self) -> EngineLoad: ...
