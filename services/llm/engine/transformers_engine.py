"""The transformers engine: continuous batching on transformers' language model, one scheduler loop.

Each iteration of the loop, on the event loop's thread, drops cancelled, expired and stop-string-ended sequences,
admits waiting requests by memory and batch size (`services.llm.engine.admission`), and picks this step's prefill chunks;
then one *step* runs in the model's worker thread:

1. one decode forward for every running sequence (`KVBatch`, which writes the new position in place);
2. one prefill forward for the chosen chunks of several prompts together (`prefill_forward`). The step's token
   budget (`max_step_tokens`, decode rows counting one each) is shared equally by the prompts being prefilled, in
   admission order, so a short prompt behind a long one finishes its prefill in one step instead of waiting for it;
3. one vectorised sampling call for every row that needs a token (one host sync), then finished rows leave the batch
   (their KV offered to the prefix cache) and prompts whose prefill completed join it.

A request for n answers is one waiting entry admitted as n rows: its prompt is prefilled once, then each answer
joins the batch as a row of its own (the prompt's KV copied into each row, the prompt's last logits sampled by each
answer's own sampler and seed).

Requests for LoRA adapters (`EngineRequest.adapter`, installed in the model as `services.model.lora.AdapterSlots`)
share every forward with each other and with the base: each forward is told the adapter slot of each of its rows.
The prefix cache keeps each entry under its adapter.

Detokenisation and stop strings run on the event loop's thread when the step's tokens are delivered, not on the model
thread. A sequence a stop string ended leaves the batch at the next step.

Faults are confined: an error in a prefill forward of several prompts is retried prompt by prompt, and only the one
that fails alone fails (out of memory: RESOURCE_EXHAUSTED; otherwise INTERNAL); an error sampling one row fails that
row; an error in the decode forward (the shared batch state) fails the running sequences with `BatchFaultError`
(UNAVAILABLE), drops the batch and serves on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from services.contract.errors import (
    InternVLError,
    InvalidArgumentError,
    NotFoundError,
    OverloadedError,
)
from services.contract.finish import FinishReason
from services.llm.engine.admission import Admission
from services.llm.engine.api import BatchFaultError, Engine, EngineLoad, GenerationStream, StepReport
from services.llm.engine.batch import COLUMN_SLACK, KVBatch, KVShape, PrefillRow, prefill_forward
from services.llm.engine.detokenize import IncrementalDetokenizer, StopStrings
from services.llm.engine.events import EngineRequest, Event, Finish, Timing, TokenDelta, Usage
from services.llm.engine.prefix_cache import LayerKV, PrefixCache, prompt_identity
from services.llm.engine.sampling import Sampler, TopLogprobs, sample_batch
from services.model.lora import AdapterSlots

log = logging.getLogger(__name__)

# The smallest prefill chunk a prompt gets in a step: bounds how many prompts share one prefill forward.
MIN_PREFILL_CHUNK = 32
# Of the memory free when the engine starts (less the prefix cache's budget), the share admission may promise to
# running sequences' KV; the rest is for activations, a prefill forward's copy of its rows' past, and the allocator.
DEFAULT_KV_SHARE = 0.8


def free_memory_bytes(device: torch.device) -> int:
    """Memory this process can still allocate on `device`: the GPU's free memory, or on the CPU the lesser of the
    kernel's MemAvailable and what the cgroup (a container's limit) leaves."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free.append(int(line.split()[1]) * 1024)
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            free.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(free) if free else 0


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
    arrival: float
    extent: int  # prompt + max_new_tokens: the most positions its KV can reach
    # Each image's embeddings (EngineRequest.image_rows), until the first chunk; then all of them in slot order
    # [slots, hidden], dropped after the prefill.
    image_parts: tuple[torch.Tensor, ...] = ()
    image_rows: torch.Tensor | None = None
    state: _State = _State.WAITING
    index: int = 0  # which of the request's answers this is
    slot: int = 0  # its adapter's slot in the engine's AdapterSlots (0: the base)
    # The request's other answers, until its prefill completes: they share its prompt's KV and logits, then run alone.
    forks: list[_Sequence] = field(default_factory=list)
    bypassed: int = 0
    cancelled: bool = False
    # A stop string ended it (found on the loop thread); its row leaves the batch at the next step.
    stopped: bool = False
    # Set at admission, on the loop thread.
    identity: np.ndarray | None = None
    ids: torch.Tensor | None = None
    sampler: Sampler | None = None
    past: list[LayerKV] | None = None  # KV of the prompt's first `prefilled` positions while it is prefilling
    prefilled: int = 0
    slots_filled: int = 0
    cached_tokens: int = 0
    generated: list[int] = field(default_factory=list)
    # Loop-side: text, and timing for metrics.
    detokenizer: IncrementalDetokenizer | None = None
    stops: StopStrings | None = None
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt)

    @property
    def rows(self) -> int:
        """Decode rows it will take: itself and its forks."""
        return 1 + len(self.forks)

    def usage(self) -> Usage:
        return Usage(self.prompt_len, len(self.generated), self.cached_tokens)

    def gone(self, now: float) -> bool:
        """Cancelled by its caller or past its deadline."""
        return self.cancelled or (self.request.deadline is not None and now >= self.request.deadline)


@dataclass
class _Plan:
    leaving: list[_Sequence]  # running sequences to drop before the decode forward
    chunks: list[tuple[_Sequence, int]]  # (prefilling sequence, prompt position its chunk ends at)


@dataclass
class _Sampled:
    seq: _Sequence
    token: int
    report: TopLogprobs | None
    reason: FinishReason | None  # decided on the model thread: the stop token, or a length limit


@dataclass
class _StepResult:
    sampled: list[_Sampled] = field(default_factory=list)
    failed: list[tuple[_Sequence, BaseException]] = field(default_factory=list)
    report: StepReport = field(default_factory=lambda: StepReport(0, 0, 0))


class TransformersEngine(Engine):
    """The scheduler over one transformers causal LM (Qwen2 or Llama layout)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, stop_token_id: int,
                 img_context_id: int, max_context_tokens: int, max_batch_size: int = 32, max_queue: int = 256,
                 max_step_tokens: int = 512, prefix_cache_budget_bytes: int = 0, kv_budget_bytes: int = 0,
                 adapters: AdapterSlots | None = None):
        self.model = model
        self.adapters = adapters
        self.tokenizer = tokenizer
        self.stop_token_id = stop_token_id
        self.img_context_id = img_context_id
        self.max_context_tokens = max_context_tokens
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_step_tokens = max_step_tokens
        self.prefix_cache = PrefixCache(prefix_cache_budget_bytes)
        self.device = model.device
        self.dtype = model.dtype
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.kv_bytes_per_token = KVShape.of(model).bytes_per_token
        if not kv_budget_bytes:
            free = free_memory_bytes(self.device) - prefix_cache_budget_bytes
            kv_budget_bytes = int(max(0, free) * DEFAULT_KV_SHARE)
        self.admission = Admission(kv_budget_bytes, self.kv_bytes_per_token, max_batch_size,
                                   max_bypass=max_batch_size, spare_columns=COLUMN_SLACK)
        self.steps = 0
        self.max_batch_size_seen = 0
        self._batch = KVBatch(model)
        self._running: list[_Sequence] = []  # in batch-row order (worker-owned during a step)
        self._prefilling: list[_Sequence] = []  # in admission order
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None

    # -- the event loop's side ------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-engine")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="llm-engine")

    async def close(self) -> None:
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
        for seq in [*self._waiting, *self._running, *self._prefilling]:
            if seq.state is not _State.DONE:
                self._finish(seq, FinishReason.CANCELLED)
        self._waiting.clear()
        self._running, self._prefilling = [], []
        self._batch = KVBatch(self.model)

    @property
    def queue_full(self) -> bool:
        return len(self._waiting) >= self.max_queue

    def load(self) -> EngineLoad:
        active = [s for s in (*self._running, *self._prefilling) if s.state is not _State.DONE]
        cache = self.prefix_cache
        return EngineLoad(
            running=sum(s.rows for s in active), waiting=len(self._waiting), kv_bytes=self._batch.nbytes,
            kv_reserved_bytes=self.admission.cost_bytes([s.extent for s in active for _ in range(s.rows)]),
            kv_budget_bytes=self.admission.budget_bytes, prefix_bytes=cache.nbytes,
            prefix_budget_bytes=cache.budget_bytes, prefix_lookups=cache.lookups, prefix_hits=cache.hits,
            steps=self.steps)

    def submit(self, request: EngineRequest) -> GenerationStream:
        if self._task is None:
            raise RuntimeError("engine not started")
        if self.queue_full:
            raise OverloadedError(f"the LLM server's queue is full ({self.max_queue} waiting requests); retry later")
        extent = len(request.prompt) + request.max_new_tokens
        answers = request.sampling.answers
        if answers > self.max_batch_size:
            raise InvalidArgumentError(f"n = {answers} answers exceed this LLM server's batch of "
                                       f"{self.max_batch_size} rows (--max-batch-size)")
        if not self.admission.fits_alone(extent, answers):
            mib = 2**20
            raise OverloadedError(
                f"this request may hold {self.admission.cost_bytes([extent] * answers) / mib:.1f} MiB of KV "
                f"({answers} x ({len(request.prompt)} prompt + {request.max_new_tokens} new tokens)), more than this "
                f"LLM server's budget of {self.admission.budget_bytes / mib:.1f} MiB; lower max_new_tokens or n, or "
                "shorten the conversation")
        slot = 0
        if request.adapter:
            if self.adapters is None or request.adapter not in self.adapters.slot:
                raise NotFoundError(f"adapter {request.adapter!r} is not loaded by this LLM server")
            slot = self.adapters.slot[request.adapter]
        queue, arrival = asyncio.Queue(), request.arrival or time.monotonic()
        group = [_Sequence(next(self._ids), dataclasses.replace(request, image_rows=(),
                                                                sampling=request.sampling.for_answer(i)),
                           queue, arrival=arrival, extent=extent, index=i, slot=slot) for i in range(answers)]
        seq = group[0]
        seq.image_parts, seq.forks = request.image_rows, group[1:]
        self._waiting.append(seq)
        self._wake.set()
        return GenerationStream(queue, lambda: self._cancel(group), answers)

    def _cancel(self, group: list[_Sequence]) -> None:
        for seq in group:
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
            except Exception as exc:  # a bug in the step's bookkeeping: nothing in the batch can be trusted
                log.exception("engine step failed; rebuilding the batch")
                result = _StepResult(failed=self._drop_batch(exc, with_prefilling=True))
            self._deliver(result)

    def _plan(self) -> _Plan | None:
        """Drops what is gone, admits what fits, picks the prefill chunks; None when there is nothing to run."""
        now = time.monotonic()
        for seq in [s for s in self._waiting if s.gone(now)]:
            self._waiting.remove(seq)
            self._finish(seq, FinishReason.CANCELLED)
        for seq in [s for s in self._prefilling if s.gone(now)]:
            self._prefilling.remove(seq)
            self._finish(seq, FinishReason.CANCELLED)
        leaving = [s for s in self._running if s.stopped or s.gone(now)]
        for seq in leaving:
            if seq.state is not _State.DONE:
                self._finish(seq, FinishReason.CANCELLED)
        admitted = [s.extent for s in self._running if s not in leaving]
        admitted += [s.extent for s in self._prefilling for _ in range(s.rows)]
        waiting = list(self._waiting)
        for index in self.admission.choose(waiting, admitted):
            seq = waiting[index]
            self._waiting.remove(seq)
            try:
                self._admit(seq)
            except Exception as exc:  # noqa: BLE001 - this request's inputs; the others go on
                self._fail(seq, _request_error(exc, seq))
                continue
            self._prefilling.append(seq)
        if self.observer is not None:
            self.observer.on_schedule(self.load())
        chunks = self._chunks(len(self._running) - len(leaving))
        if not self._running and not chunks:
            return None
        return _Plan(leaving, chunks)

    def _admit(self, seq: _Sequence) -> None:
        """Prefill bookkeeping (no torch kernel: see `_prepare`): text state and the longest cached prefix."""
        prompt = seq.request.prompt
        seq.identity = prompt_identity(prompt.token_ids, prompt.image_keys, self.img_context_id)
        match = self.prefix_cache.lookup(seq.identity, max_length=seq.prompt_len - 1, adapter=seq.request.adapter)
        if match is not None:
            seq.past, seq.prefilled = match.layers, match.length
            seq.slots_filled = int(np.count_nonzero(np.asarray(prompt.token_ids[:match.length]) == self.img_context_id))
        now = time.monotonic()
        for answer in (seq, *seq.forks):
            answer.state = _State.PREFILL
            answer.admitted_at = now
            answer.identity = seq.identity
            answer.detokenizer = IncrementalDetokenizer(self.tokenizer)
            answer.stops = StopStrings(answer.request.sampling.stop_strings)
            answer.cached_tokens = match.length if match is not None else 0

    def _chunks(self, decode_rows: int) -> list[tuple[_Sequence, int]]:
        """This step's prefill chunks: the token budget left after the decode rows, shared equally by the first
        prompts in admission order (each gets at least MIN_PREFILL_CHUNK)."""
        if not self._prefilling:
            return []
        budget = max(self.max_step_tokens - decode_rows, MIN_PREFILL_CHUNK)
        rows = self._prefilling[:max(1, budget // MIN_PREFILL_CHUNK)]
        share = budget // len(rows)
        return [(seq, min(seq.prefilled + share, seq.prompt_len)) for seq in rows]

    def _finish(self, seq: _Sequence, reason: FinishReason) -> None:
        """Ends `seq` (and its forks, while it has them: a request not yet prefilled ends as a whole)."""
        now = time.monotonic()
        for answer in (seq, *seq.forks):
            self._end(answer)
            timing = Timing(answer.arrival, answer.admitted_at, answer.first_token_at, now)
            self._put(answer, Finish(reason, answer.usage(), answer.index, timing))

    def _fail(self, seq: _Sequence, exc: BaseException) -> None:
        for answer in (seq, *seq.forks):
            self._end(answer)
            self._put(answer, exc)

    @staticmethod
    def _end(seq: _Sequence) -> None:
        seq.state = _State.DONE
        seq.past = seq.image_rows = None
        seq.image_parts = ()

    def _put(self, seq: _Sequence, event: Event | BaseException) -> None:
        seq.queue.put_nowait(event)
        if isinstance(event, Finish) and self.observer is not None:
            # The prompt is the request's, counted once (with answer 0), as OpenAI's usage counts it.
            first = event.index == 0
            self.observer.on_finish(event.reason.value, event.usage.prompt_tokens if first else 0,
                                    event.usage.cached_prompt_tokens if first else 0, seq.request.adapter)

    def _deliver(self, result: _StepResult) -> None:
        """The step's tokens as text and events, on the event loop's thread."""
        now = time.monotonic()
        timed = []
        for sampled in result.sampled:
            seq = sampled.seq
            if seq.state is _State.DONE:
                continue
            delta, reason = self._text(seq, sampled)
            self._put(seq, delta)
            timed.append((seq.arrival, seq.last_token_at, delta, seq.request.adapter))
            seq.last_token_at = now
            if seq.first_token_at is None:
                seq.first_token_at = now
            if reason is not None:
                if sampled.reason is None:
                    seq.stopped = True  # a stop string: the model thread still has its row
                self._finish(seq, reason)
        for seq, exc in result.failed:
            if seq.state is not _State.DONE:
                self._fail(seq, exc)
        self._prefilling = [s for s in self._prefilling if s.state is _State.PREFILL]
        if self.observer is not None:
            self.observer.on_step(result.report)
            self.observer.on_tokens(timed, now)
            self.observer.on_schedule(self.load())

    def _text(self, seq: _Sequence, sampled: _Sampled) -> tuple[TokenDelta, FinishReason | None]:
        """The text the token completes (held back while it may start a stop string) and the finish it causes."""
        reason = sampled.reason
        text, hit = ("", False) if sampled.token == self.stop_token_id else seq.stops.feed(
            seq.detokenizer.add(sampled.token))
        if hit:
            reason = FinishReason.STOP
        elif reason is not None:
            # Generation ends: text held back inside a multi-byte character, then any held back as the possible start
            # of a stop string, are the answer's end, unless they complete a stop string.
            more, hit = seq.stops.feed(seq.detokenizer.flush())
            text += more if hit else more + seq.stops.flush()
            reason = FinishReason.STOP if hit else reason
        report = (sampled.report,) if sampled.report is not None else ()
        return TokenDelta((sampled.token,), text, report, seq.index), reason

    def _drop_batch(self, exc: BaseException, with_prefilling: bool = False) -> list[tuple[_Sequence, BaseException]]:
        """Fails every running sequence (and the prefilling ones) with BatchFaultError and starts a fresh batch."""
        log.error("dropping the decode batch of %d sequences after %s: %s", len(self._running), type(exc).__name__,
                  exc)
        lost = [*self._running, *(self._prefilling if with_prefilling else ())]
        error = BatchFaultError(f"the LLM server's batch failed ({type(exc).__name__}) and was rebuilt; retry the "
                                "request")
        self._running = []
        self._batch = KVBatch(self.model)
        return [(seq, error) for seq in lost]

    # -- the model's worker thread --------------------------------------------------------------------------------

    @torch.inference_mode()
    def _step(self, plan: _Plan) -> _StepResult:
        result = _StepResult()
        for seq in plan.leaving:
            self._leave(seq, remember=seq.stopped)
        decode_logits = None
        decoding = list(self._running)
        if decoding:
            try:
                tokens = torch.tensor([seq.generated[-1] for seq in decoding], device=self.device)
                with self._rows(decoding):
                    decode_logits = self._batch.forward(tokens)
            except Exception as exc:  # noqa: BLE001 - the batch state is suspect: drop it, serve on
                result.failed += self._drop_batch(exc)
                decoding = []
            self.max_batch_size_seen = max(self.max_batch_size_seen, len(decoding))
        prefill_logits, completed, fed = self._prefill(plan.chunks, result.failed)
        rows = decoding + [seq for seq, _ in completed]
        logits = [t for t in (decode_logits, prefill_logits) if t is not None]
        if rows:
            self._sample(rows, torch.cat(logits) if len(logits) > 1 else logits[0], result)
        for seq in [s.seq for s in result.sampled if s.reason is not None and s.seq in self._running]:
            self._leave(seq, remember=True)
        failed = {id(seq) for seq, _ in result.failed}
        ended = {id(s.seq) for s in result.sampled if s.reason is not None}
        joining = []
        for seq, kv in completed:
            if id(seq) in ended:  # finished on its first token: its prompt's KV never joins the batch
                self._remember(seq, lambda kv=kv: [(k.clone(), v.clone()) for k, v in kv])
            elif id(seq) not in failed:
                joining.append((seq, kv))
        self._batch.add([kv for _, kv in joining])
        self._running += [seq for seq, _ in joining]
        self.steps += 1
        result.report = StepReport(len(decoding), len(plan.chunks), fed)
        return result

    def _leave(self, seq: _Sequence, remember: bool) -> None:
        """Removes a running sequence's row (offering its KV to the prefix cache first when `remember`)."""
        row = self._running.index(seq)
        if remember:
            self._remember(seq, lambda: self._batch.row(row))
        self._batch.remove(row)
        self._running[row] = self._running[-1]
        self._running.pop()

    def _prefill(self, chunks: list[tuple[_Sequence, int]], failed: list
                 ) -> tuple[torch.Tensor | None, list[tuple[_Sequence, list[LayerKV]]], int]:
        """Runs the chunks in one forward (one at a time when that fails, to find the request at fault).

        Returns the next-token logits of the prompts it completed [completed, vocab], those prompts with their KV,
        and the number of prompt tokens fed.
        """
        ready = []
        for chunk in chunks:
            try:
                self._prepare(chunk[0])
            except Exception as exc:  # noqa: BLE001 - this request's inputs only
                failed.append((chunk[0], _request_error(exc, chunk[0])))
            else:
                ready.append(chunk)
        chunks = ready
        if not chunks:
            return None, [], 0
        try:
            hidden, done, fed = self._prefill_together(chunks)
        except Exception as exc:  # noqa: BLE001 - find which request it was
            if len(chunks) == 1:
                failed.append((chunks[0][0], _request_error(exc, chunks[0][0])))
                return None, [], 0
            log.warning("a prefill of %d prompts failed (%s); retrying them one by one", len(chunks), exc)
            parts, done, fed = [], [], 0
            for chunk in chunks:
                try:
                    part, part_done, part_fed = self._prefill_together([chunk])
                except Exception as one_exc:  # noqa: BLE001 - this request's fault only
                    failed.append((chunk[0], _request_error(one_exc, chunk[0])))
                    continue
                parts.append(part)
                done += part_done
                fed += part_fed
            hidden = torch.cat(parts) if parts else None
        if not done:
            return None, [], fed
        with self._rows([seq for seq, _ in done]):
            logits = self.model.get_output_embeddings()(hidden)
        return self._fork(logits, done) + (fed,)

    @staticmethod
    def _fork(logits: torch.Tensor, done: list[tuple[_Sequence, list[LayerKV]]]
              ) -> tuple[torch.Tensor, list[tuple[_Sequence, list[LayerKV]]]]:
        """Completed prompts' logits [completed, vocab] and KV, with each prompt's forks after it sharing both (the
        batch copies the KV into a row per answer): [answers, vocab]."""
        if all(not seq.forks for seq, _ in done):
            return logits, done
        counts = torch.tensor([seq.rows for seq, _ in done], device=logits.device)
        answers = []
        for seq, kv in done:
            for fork in seq.forks:
                fork.state = _State.RUNNING
            answers += [(answer, kv) for answer in (seq, *seq.forks)]
            seq.forks = []
        return logits.repeat_interleave(counts, dim=0), answers

    def _prepare(self, seq: _Sequence) -> None:
        """Before a prompt's first chunk, on the model's thread (every torch kernel of the engine runs on this one
        thread: see services.runtime.own_thread): token ids, sampler, the image rows in slot order, checked."""
        if seq.ids is not None:
            return
        for image, rows in zip(seq.request.prompt.images, seq.image_parts, strict=True):
            if not bool(torch.isfinite(rows).all()):
                # NaN or inf would make this request's logits NaN; caught here, it fails alone and clearly.
                raise InvalidArgumentError(f"embeddings of {image.key} contain NaN or infinite values")
        if seq.image_parts:
            seq.image_rows = torch.cat(seq.image_parts).to(device=self.device, dtype=self.dtype)
            seq.image_parts = ()
        for answer in (seq, *seq.forks):
            answer.sampler = Sampler(answer.request.sampling, self.vocab_size, self.device,
                                     grammar=answer.request.grammar)
        seq.ids = torch.tensor(seq.request.prompt.token_ids, device=self.device)

    def _prefill_together(self, chunks: list[tuple[_Sequence, int]]
                          ) -> tuple[torch.Tensor | None, list[tuple[_Sequence, list[LayerKV]]], int]:
        rows = [PrefillRow(seq.past, seq.prefilled, self._chunk_embeds(seq, end)) for seq, end in chunks]
        with self._rows([seq for seq, _ in chunks]):
            hidden, kv = prefill_forward(self.model, rows)
        done, keep = [], []
        for i, ((seq, end), layers) in enumerate(zip(chunks, kv, strict=True)):
            seq.slots_filled += int(np.count_nonzero(
                np.asarray(seq.request.prompt.token_ids[seq.prefilled:end]) == self.img_context_id))
            seq.prefilled = end
            if end < seq.prompt_len:
                seq.past = [(k.clone(), v.clone()) for k, v in layers]  # owns its memory; the forward's buffer goes
            else:
                seq.past = seq.image_rows = None
                seq.state = _State.RUNNING
                done.append((seq, layers))
                keep.append(i)
        fed = sum(end - row.past_length for (_, end), row in zip(chunks, rows, strict=True))
        return (hidden[keep] if keep else None), done, fed

    def _chunk_embeds(self, seq: _Sequence, end: int) -> torch.Tensor:
        """Input embeddings of prompt positions [prefilled, end), image rows in their slots: [end - prefilled, hidden]."""
        chunk = seq.ids[seq.prefilled:end]
        embeds = self.model.get_input_embeddings()(chunk)
        if seq.image_rows is not None:
            slots = chunk == self.img_context_id
            count = int(slots.sum())
            if count:
                embeds[slots] = seq.image_rows[seq.slots_filled:seq.slots_filled + count]
        return embeds

    def _sample(self, rows: list[_Sequence], logits: torch.Tensor, result: _StepResult) -> None:
        """One token for each row of `logits` [rows, vocab]; a row whose sampling fails fails alone."""
        try:
            picked = list(zip(rows, *sample_batch(logits, [seq.sampler for seq in rows]), strict=True))
        except Exception as exc:  # noqa: BLE001 - find the row at fault
            log.warning("sampling %d rows failed (%s); sampling them one by one", len(rows), exc)
            picked = []
            for i, seq in enumerate(rows):
                try:
                    [token], [report] = sample_batch(logits[i:i + 1], [seq.sampler])
                except Exception as one_exc:  # noqa: BLE001 - this request's fault only
                    result.failed.append((seq, _request_error(one_exc, seq)))
                    self._forget(seq)
                    continue
                picked.append((seq, token, report))
        for seq, token, report in picked:
            seq.generated.append(token)
            reason = None
            if token == self.stop_token_id:
                reason = FinishReason.STOP
            elif (len(seq.generated) >= seq.request.max_new_tokens
                  or seq.prompt_len + len(seq.generated) >= self.max_context_tokens):
                reason = FinishReason.LENGTH
            result.sampled.append(_Sampled(seq, token, report, reason))

    def _rows(self, seqs: list[_Sequence]):
        """The adapter slot of each row of the forward inside (row i is `seqs[i]`)."""
        if self.adapters is None:
            return contextlib.nullcontext()
        return self.adapters.rows([seq.slot for seq in seqs], self.device)

    def _forget(self, seq: _Sequence) -> None:
        """Takes a failed sequence out of the batch (a prefilled one is kept from joining by `_step`)."""
        if seq in self._running:
            self._leave(seq, remember=False)

    def _remember(self, seq: _Sequence, layers) -> None:
        """Offers a finished sequence's KV (`layers()` extracts it) to the prefix cache: the prompt and every
        generated token but the last, which was never fed back."""
        length = seq.prompt_len + len(seq.generated) - 1
        if not self.prefix_cache.enabled or length * self.kv_bytes_per_token > self.prefix_cache.budget_bytes:
            return
        fed = np.asarray(seq.generated[:-1], dtype=np.int64)
        self.prefix_cache.insert(np.concatenate([seq.identity, fed]), layers(), adapter=seq.request.adapter)


def _request_error(exc: BaseException, seq: _Sequence) -> BaseException:
    """What a caller is told when computing its request failed."""
    if isinstance(exc, InternVLError):
        return exc
    if isinstance(exc, torch.OutOfMemoryError):
        return OverloadedError(f"the LLM server ran out of memory computing this request ({seq.prompt_len} prompt "
                               "tokens); retry later or with a shorter conversation")
    log.error("request %s failed: %s: %s", seq.request.request_id or seq.id, type(exc).__name__, exc)
    return InternVLError(f"the LLM server failed computing this request ({type(exc).__name__}); other requests "
                         "are unaffected")
