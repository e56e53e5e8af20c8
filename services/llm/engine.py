"""Continuous batching: one scheduler loop that interleaves the decode steps of all running sequences with chunked
prefills of new ones, on transformers' language model.

Each iteration of the loop, on the asyncio thread, first drops cancelled or expired sequences and admits at most one
waiting request into prefill (bookkeeping only), then runs one *step* in the model's worker thread:

1. one batched decode forward for every running sequence (`DecodeBatch`: left-padded KV, attention mask and
   per-row position_ids), a token sampled for each, finished sequences removed (their KV kept by the prefix cache);
2. at most one prefill chunk (`prefill_chunk_tokens`) of the sequence being admitted; its first chunk starts after
   the longest prefix the prefix cache holds; after its last chunk its first token is sampled and it joins the batch.

So a long prompt delays running streams by one chunk per step, never by its whole prefill, and a cancelled stream
leaves the batch at the next step. The events (tokens, text, finish) go back to each stream's asyncio queue.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from services.common.contract.errors import OverloadedError
from services.common.contract.finish import FinishReason
from services.llm.batch import DecodeBatch, cache_layers, make_cache
from services.llm.detokenize import IncrementalDetokenizer, StopStrings
from services.llm.events import EngineRequest, Event, Finish, TokenDelta, Usage
from services.llm.kv_cache import LayerKV, PrefixCache, prompt_identity
from services.llm.sampling import Sampler, TopLogprobs, sample_batch

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """Counters for metrics and tests; read on the asyncio thread."""

    steps: int = 0
    max_batch_size_seen: int = 0
    running: int = 0
    waiting: int = 0


class _State(enum.Enum):
    WAITING = 1
    PREFILL = 2
    RUNNING = 3
    DONE = 4


@dataclass(eq=False)
class _Sequence:
    id: int
    request: EngineRequest
    queue: asyncio.Queue
    arrival: float = field(default_factory=time.monotonic)
    state: _State = _State.WAITING
    cancelled: bool = False
    # Worker-side state, created at admission.
    ids: torch.Tensor | None = None
    identity: np.ndarray | None = None
    sampler: Sampler | None = None
    detokenizer: IncrementalDetokenizer | None = None
    stops: StopStrings | None = None
    cache: DynamicCache | None = None
    # The request's image embeddings, moved here at submit and dropped after the prefill.
    image_rows: torch.Tensor | None = None
    prefilled: int = 0
    slots_filled: int = 0
    cached_tokens: int = 0
    generated: list[int] = field(default_factory=list)
    # Loop-side timing, for metrics.
    last_token_at: float | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt)

    def usage(self) -> Usage:
        return Usage(self.prompt_len, len(self.generated), self.cached_tokens)

    def expired(self, now: float) -> bool:
        return self.request.deadline is not None and now >= self.request.deadline


@dataclass
class _Plan:
    keep_rows: list[int] | None
    prefill: _Sequence | None


@dataclass
class _StepResult:
    events: list[tuple[_Sequence, Event | BaseException]]
    decode_batch_size: int = 0
    prefill_tokens: int = 0


class GenerationStream:
    """The events of one request: TokenDelta..., then one Finish. `cancel()` frees its slot at the next step."""

    def __init__(self, engine: Engine, seq: _Sequence):
        self._engine = engine
        self._seq = seq
        self._done = False

    @property
    def cached_prompt_tokens(self) -> int:
        return self._seq.cached_tokens

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        item = await self._seq.queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if isinstance(item, Finish):
            self._done = True
        return item

    def cancel(self) -> None:
        self._engine.cancel(self._seq)


class Engine:
    """The scheduler. Create, `await start()`, `submit()` from the event loop's thread, `await close()`."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, stop_token_id: int,
                 img_context_id: int, max_context_tokens: int, max_batch_size: int = 32, max_queue: int = 256,
                 prefill_chunk_tokens: int = 512, kv_cache_budget_bytes: int = 0, observer=None):
        self.model = model
        self.tokenizer = tokenizer
        self.stop_token_id = stop_token_id
        self.img_context_id = img_context_id
        self.max_context_tokens = max_context_tokens
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.prefix_cache = PrefixCache(kv_cache_budget_bytes)
        # Hooks called on the loop thread (services.llm.metrics.LLMMetrics): on_step, on_tokens, on_finish,
        # on_schedule.
        self.observer = observer
        self.stats = EngineStats()
        self.device = model.device
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # Keys and values of every layer for one position.
        self.kv_bytes_per_token = (2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
                                   * model.dtype.itemsize)
        self._batch = DecodeBatch(model)
        self._running: list[_Sequence] = []  # in batch-row order
        self._prefilling: _Sequence | None = None
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None

    # -- asyncio side ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-engine")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="llm-engine")

    async def close(self) -> None:
        """Stops the loop; every unfinished stream ends with FINISH_REASON_CANCELLED."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._executor is not None:
            # Lets a step already in the worker end before the state it mutates is torn down.
            await asyncio.to_thread(self._executor.shutdown, True, cancel_futures=True)
            self._executor = None
        for seq in [*self._waiting, *self._running, *([self._prefilling] if self._prefilling else [])]:
            self._finish_now(seq, FinishReason.CANCELLED)
        self._waiting.clear()
        self._running, self._prefilling = [], None
        self._batch = DecodeBatch(self.model)

    @property
    def queue_full(self) -> bool:
        return len(self._waiting) >= self.max_queue

    def submit(self, request: EngineRequest) -> GenerationStream:
        if self._task is None:
            raise RuntimeError("engine not started")
        if self.queue_full:
            raise OverloadedError(f"the LLM server's queue is full ({self.max_queue} waiting requests); retry later")
        seq = _Sequence(next(self._ids), dataclasses.replace(request, image_rows=None), asyncio.Queue(),
                        arrival=request.arrival or time.monotonic(), image_rows=request.image_rows)
        self._waiting.append(seq)
        self.stats.waiting = len(self._waiting)
        self._wake.set()
        return GenerationStream(self, seq)

    def cancel(self, seq: _Sequence) -> None:
        if seq.state is not _State.DONE:
            seq.cancelled = True
            self._wake.set()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            plan = self._plan()
            if plan is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                result = await loop.run_in_executor(self._executor, self._step, plan)
            except Exception as exc:
                log.exception("engine step failed; failing the sequences in it")
                result = _StepResult(self._fail_all(exc))
            self._deliver(result)

    def _plan(self) -> _Plan | None:
        """Drops cancelled and expired sequences, admits one waiting request; None when there is nothing to run."""
        now = time.monotonic()
        for seq in [s for s in self._waiting if s.cancelled or s.expired(now)]:
            self._waiting.remove(seq)
            self._finish_now(seq, FinishReason.CANCELLED)
        keep_rows = None
        gone = [s for s in self._running if s.cancelled or s.expired(now)]
        if gone:
            keep_rows = [row for row, s in enumerate(self._running) if s not in gone]
            self._running = [s for s in self._running if s not in gone]
            for seq in gone:
                self._finish_now(seq, FinishReason.CANCELLED)
        if self._prefilling is not None and (self._prefilling.cancelled or self._prefilling.expired(now)):
            self._finish_now(self._prefilling, FinishReason.CANCELLED)
            self._prefilling = None
        if self._prefilling is None and self._waiting and len(self._running) < self.max_batch_size:
            self._prefilling = self._waiting.popleft()
            self._prefilling.state = _State.PREFILL
        self.stats.waiting = len(self._waiting)
        self.stats.running = len(self._running) + (self._prefilling is not None)
        if self.observer is not None:
            self.observer.on_schedule(self)
        if not self._running and self._prefilling is None and keep_rows is None:
            return None
        return _Plan(keep_rows, self._prefilling)

    @property
    def running_kv_bytes(self) -> int:
        return self._batch.nbytes

    def _finish_now(self, seq: _Sequence, reason: FinishReason) -> None:
        seq.state = _State.DONE
        seq.cache = None
        self._put(seq, Finish(reason, seq.usage()))

    def _put(self, seq: _Sequence, event: Event | BaseException) -> None:
        seq.queue.put_nowait(event)
        if isinstance(event, Finish) and self.observer is not None:
            self.observer.on_finish(event.reason.value, event.usage.prompt_tokens, event.usage.cached_prompt_tokens)

    def _deliver(self, result: _StepResult) -> None:
        now = time.monotonic()
        timed = []
        for seq, event in result.events:
            self._put(seq, event)
            if isinstance(event, TokenDelta):
                timed.append((seq.arrival, seq.last_token_at, event))
                seq.last_token_at = now
        if self._prefilling is not None and self._prefilling.state is not _State.PREFILL:
            self._prefilling = None  # finished its prefill in this step
        self.stats.running = len(self._running) + (self._prefilling is not None)
        if self.observer is not None:
            self.observer.on_step(result.decode_batch_size, result.prefill_tokens)
            self.observer.on_tokens(timed, now)
            self.observer.on_schedule(self)

    def _fail_all(self, exc: Exception) -> list[tuple[_Sequence, BaseException]]:
        failed = [*self._running, *([self._prefilling] if self._prefilling else [])]
        self._running, self._prefilling = [], None
        self._batch = DecodeBatch(self.model)
        for seq in failed:
            seq.state, seq.cache = _State.DONE, None
        return [(seq, exc) for seq in failed]

    # -- worker thread --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _step(self, plan: _Plan) -> _StepResult:
        result = _StepResult([])
        if plan.keep_rows is not None:
            self._batch.keep(plan.keep_rows)
        if self._running:
            result.decode_batch_size = len(self._running)
            self._decode(result.events)
        if plan.prefill is not None:
            result.prefill_tokens = self._prefill_chunk(plan.prefill, result.events)
        self.stats.steps += 1
        return result

    def _decode(self, events: list) -> None:
        running = self._running
        logits = self._batch.forward([seq.generated[-1] for seq in running])
        self.stats.max_batch_size_seen = max(self.stats.max_batch_size_seen, len(running))
        tokens, reports = sample_batch(logits, [seq.sampler for seq in running])
        keep = []
        for row, (seq, token, report) in enumerate(zip(running, tokens, reports, strict=True)):
            if self._emit(seq, token, report, events):
                self._remember(seq, self._batch.lengths[row], lambda row=row: self._batch.row(row))
            else:
                keep.append(row)
        self._batch.keep(keep)
        self._running = [running[row] for row in keep]

    def _admit(self, seq: _Sequence) -> None:
        """First chunk of a prefill: device tensors, sampler, and the longest cached prefix."""
        prompt, request = seq.request.prompt, seq.request
        seq.ids = torch.tensor(prompt.token_ids, device=self.device)
        seq.identity = prompt_identity(prompt.token_ids, prompt.image_keys, self.img_context_id)
        penalty_ids = seq.ids if request.sampling.penalty is not None else None
        seq.sampler = Sampler(request.sampling, self.vocab_size, self.device, penalty_ids)
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer)
        seq.stops = StopStrings(request.sampling.stop_strings)
        match = self.prefix_cache.lookup(seq.identity, max_length=seq.prompt_len - 1)
        if match is None:
            seq.cache = make_cache(self.model)
        else:
            seq.cache = make_cache(self.model, [(k[None], v[None]) for k, v in match.layers])
            seq.prefilled = seq.cached_tokens = match.length
            seq.slots_filled = int((seq.ids[:match.length] == self.img_context_id).sum())

    def _prefill_chunk(self, seq: _Sequence, events: list) -> int:
        """Prefills the next chunk of `seq`; returns the number of tokens it fed."""
        if seq.cache is None:
            self._admit(seq)
        start = seq.prefilled
        end = min(start + self.prefill_chunk_tokens, seq.prompt_len)
        chunk = seq.ids[start:end]
        embeds = self.model.get_input_embeddings()(chunk[None])
        rows = seq.image_rows
        if rows is not None:
            slots = chunk == self.img_context_id
            count = int(slots.sum())
            if count:
                part = rows[seq.slots_filled:seq.slots_filled + count]
                embeds[0, slots] = part.to(device=self.device, dtype=embeds.dtype)
                seq.slots_filled += count
        positions = torch.arange(start, end, device=self.device)[None]
        out = self.model(inputs_embeds=embeds, position_ids=positions, cache=seq.cache, use_cache=True,
                         logits_to_keep=1)
        seq.prefilled = end
        if end < seq.prompt_len:
            return end - start
        seq.image_rows = None
        [token], [report] = sample_batch(out.logits[:, -1], [seq.sampler])
        if self._emit(seq, token, report, events):
            cache = seq.cache
            self._remember(seq, seq.prompt_len, lambda: [(k[0], v[0]) for k, v in cache_layers(cache)])
        else:
            self._batch.add(seq.cache, seq.prompt_len)
            seq.state = _State.RUNNING
            self._running.append(seq)
        seq.cache = None
        return end - start

    def _emit(self, seq: _Sequence, token: int, report: TopLogprobs | None, events: list) -> bool:
        """Records a sampled token and its event(s); True when the sequence finished with it."""
        seq.generated.append(token)
        reason = None
        if token == self.stop_token_id:
            reason, text = FinishReason.STOP, seq.stops.flush()
        else:
            text, hit = seq.stops.feed(seq.detokenizer.add(token))
            if hit:
                reason = FinishReason.STOP
            elif (len(seq.generated) >= seq.request.max_new_tokens
                  or seq.prompt_len + len(seq.generated) >= self.max_context_tokens):
                reason = FinishReason.LENGTH
                text += seq.stops.flush()
        events.append((seq, TokenDelta((token,), text, (report,) if report is not None else ())))
        if reason is not None:
            seq.state = _State.DONE
            events.append((seq, Finish(reason, seq.usage())))
        return reason is not None

    def _remember(self, seq: _Sequence, length: int, layers: Callable[[], list[LayerKV]]) -> None:
        """Offers a finished sequence's KV (`length` positions; `layers()` extracts them) to the prefix cache."""
        if not self.prefix_cache.enabled or length * self.kv_bytes_per_token > self.prefix_cache.budget_bytes:
            return
        fed = np.asarray(seq.generated[:length - seq.prompt_len], dtype=np.int64)
        self.prefix_cache.insert(np.concatenate([seq.identity, fed]), layers())
