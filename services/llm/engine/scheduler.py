"""The transformers engine's scheduler: which requests run, what each step computes, and what their callers get.

All of it on the event loop's thread; the model runner is reached through the step contract
(services.llm.engine.step) only. Before each step, `plan`:

- drops what is gone: requests cancelled by their caller or past their deadline (one that never left the waiting
  queue fails DeadlineExceededError, nothing of it computed), and answers a stop string ended;
- admits waiting requests by memory and batch size (`services.llm.engine.admission`), handing each to the runner;
  the waiting queue is kept in priority order (critical, standard, sheddable; FIFO within one), so more important
  requests are admitted first. There is no ageing: under a steady stream of critical requests, standard ones wait
  (their deadline, and the gateway's admission, bound how long);
- picks the step's prefill chunks: the step's token budget (`max_step_tokens`, decode rows counting one each) is
  shared equally by the prompts being prefilled, in admission order (each gets at least MIN_PREFILL_CHUNK), so a
  short prompt behind a long one finishes its prefill in one step instead of waiting for it.

After the step, `update` turns each row's token into text (detokenisation and stop strings run here, not on the
model's thread), sends the events, and ends the answers that are done. An answer a stop string ended keeps its row
until the next step's plan (`Leave` with `remember`).

A request for n answers (`_Group`) waits, is admitted and is prefilled as one entry costing n rows, and ends as a
whole until its prompt forks; from then on each answer (`_Answer`) goes its own way.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from services.contract.errors import DeadlineExceededError, InvalidArgumentError, OverloadedError
from services.contract.finish import FinishReason, Usage
from services.llm.engine.admission import Admission
from services.llm.engine.api import EngineLoad, EngineObserver, GenerationStream
from services.llm.engine.detokenize import IncrementalDetokenizer, StopStrings
from services.llm.engine.events import EngineRequest, Event, Finish, Timing, TokenDelta
from services.llm.engine.prefix_cache import PrefixCache
from services.llm.engine.step import Chunk, Leave, NewPrompt, Sampled, StepPlan, StepResult, batch_fault

# The smallest prefill chunk a prompt gets in a step: bounds how many prompts share one prefill forward.
MIN_PREFILL_CHUNK = 32


class Runner(Protocol):
    """What the scheduler calls on the model runner (services.llm.engine.runner.ModelRunner), between steps."""

    prefix_cache: PrefixCache
    steps: int

    def admit(self, new: NewPrompt) -> int: ...

    def release(self, prompt: int) -> None: ...

    def reset(self) -> None: ...


class _State(enum.Enum):
    WAITING = 1
    PREFILL = 2
    RUNNING = 3
    DONE = 4


@dataclass(eq=False)
class _Answer:
    """One answer's delivery state: its text so far, its timing, and whether it is done."""

    id: int  # its sequence id in the step contract
    index: int  # which of the request's answers it is
    group: _Group
    state: _State = _State.WAITING
    # A stop string ended it (found here, after the step); its row leaves the batch at the next step.
    stopped: bool = False
    generated: int = 0  # tokens delivered
    detokenizer: IncrementalDetokenizer | None = None
    stops: StopStrings | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None


@dataclass(eq=False)
class _Group:
    """A submitted request: its answers share one waiting entry, one admission and one prefill."""

    request: EngineRequest  # as submitted, less its image rows
    queue: asyncio.Queue  # the GenerationStream's
    arrival: float
    extent: int  # prompt + max_new_tokens: the most positions an answer's KV can reach
    # The image rows (EngineRequest.image_rows) until admission hands them to the runner.
    images: tuple[torch.Tensor, ...] = ()
    answers: list[_Answer] = field(default_factory=list)
    bypassed: int = 0  # later requests admitted before it (services.llm.engine.admission)
    cancelled: bool = False
    prefilled: int = 0  # prompt positions whose KV exists (cached or fed): where its next chunk starts
    cached_tokens: int = 0
    admitted_at: float | None = None

    @property
    def id(self) -> int:
        """Its prompt's id in the step contract: its first answer's."""
        return self.answers[0].id

    @property
    def rows(self) -> int:
        """Decode rows it will take: one per answer."""
        return len(self.answers)

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt)

    @property
    def prefilling(self) -> bool:
        """Admitted, not yet forked and not ended (its answers share their state until the fork)."""
        return self.answers[0].state is _State.PREFILL

    def gone(self, now: float) -> bool:
        """Cancelled by its caller or past its deadline."""
        return self.cancelled or (self.request.deadline is not None and now >= self.request.deadline)


class Scheduler:
    """Decides each step of one model runner and delivers what it computed."""

    def __init__(self, runner: Runner, tokenizer: PreTrainedTokenizerBase, admission: Admission, *,
                 stop_token_id: int, max_step_tokens: int, wake: Callable[[], None] = lambda: None):
        """`wake()` is called when there is new work (a request, a cancel) for the loop that plans the steps."""
        self.runner = runner
        self.tokenizer = tokenizer
        self.admission = admission
        self.stop_token_id = stop_token_id
        self.max_step_tokens = max_step_tokens
        self.observer: EngineObserver | None = None
        self._wake = wake
        self._waiting: collections.deque[_Group] = collections.deque()
        self._prefilling: list[_Group] = []  # in admission order
        self._running: list[_Answer] = []  # the answers with a row in the runner's batch
        self._ids = itertools.count()
        self._kv_bytes = 0  # the batch's KV memory, as the last step left it

    # -- requests -------------------------------------------------------------------------------------------------

    def submit(self, request: EngineRequest) -> GenerationStream:
        """Queues `request`; refuses at once one that could never be admitted."""
        extent = len(request.prompt) + request.max_new_tokens
        answers = request.sampling.answers
        if answers > self.admission.max_batch_size:
            raise InvalidArgumentError(f"n = {answers} answers exceed this LLM server's batch of "
                                       f"{self.admission.max_batch_size} rows (--max-batch-size)")
        if not self.admission.fits_alone(extent, answers):
            mib = 2**20
            raise OverloadedError(
                f"this request may hold {self.admission.cost_bytes([extent] * answers) / mib:.1f} MiB of KV "
                f"({answers} x ({len(request.prompt)} prompt + {request.max_new_tokens} new tokens)), more than this "
                f"LLM server's budget of {self.admission.budget_bytes / mib:.1f} MiB; lower max_new_tokens or n, or "
                "shorten the conversation")
        group = _Group(dataclasses.replace(request, image_rows=()), asyncio.Queue(),
                       arrival=request.arrival or time.monotonic(), extent=extent, images=request.image_rows)
        group.answers = [_Answer(next(self._ids), i, group) for i in range(answers)]
        # Behind every waiting request at least as important as it: most important first, FIFO within a priority.
        place = next((i for i, waiting in enumerate(self._waiting) if waiting.request.priority > request.priority),
                     len(self._waiting))
        self._waiting.insert(place, group)
        self._wake()
        return GenerationStream(group.queue, lambda: self._cancel(group), answers)

    def _cancel(self, group: _Group) -> None:
        group.cancelled = True
        self._wake()

    def load(self) -> EngineLoad:
        running = [answer for answer in self._running if answer.state is not _State.DONE]
        prefilling = [group for group in self._prefilling if group.prefilling]
        extents = [answer.group.extent for answer in running]
        extents += [group.extent for group in prefilling for _ in range(group.rows)]
        cache = self.runner.prefix_cache
        return EngineLoad(
            running=len(extents), waiting=len(self._waiting), kv_bytes=self._kv_bytes,
            kv_reserved_bytes=self.admission.cost_bytes(extents), kv_budget_bytes=self.admission.budget_bytes,
            prefix_bytes=cache.nbytes, prefix_budget_bytes=cache.budget_bytes, prefix_lookups=cache.lookups,
            prefix_hits=cache.hits, steps=self.runner.steps)

    # -- before a step --------------------------------------------------------------------------------------------

    def plan(self) -> StepPlan | None:
        """Drops what is gone, admits what fits, picks the prefill chunks; None when there is nothing to run."""
        now = time.monotonic()
        for group in [g for g in self._waiting if g.gone(now)]:
            self._waiting.remove(group)
            if group.cancelled:
                self._finish(group.answers, FinishReason.CANCELLED)
            else:  # its deadline passed before it ran: nothing of it is computed
                self._fail(group.answers, DeadlineExceededError("the request's deadline passed while it waited in "
                                                                "the LLM server's queue; nothing of it ran"))
        for group in [g for g in self._prefilling if g.gone(now)]:
            self._prefilling.remove(group)
            self.runner.release(group.id)
            self._finish(group.answers, FinishReason.CANCELLED)
        leaving = [answer for answer in self._running if answer.stopped or answer.group.gone(now)]
        for answer in leaving:
            if answer.state is not _State.DONE:
                self._finish([answer], FinishReason.CANCELLED)
        self._running = [answer for answer in self._running if answer not in leaving]
        self._admit_waiting()
        if self.observer is not None:
            self.observer.on_schedule(self.load())
        chunks = self._chunks(len(self._running))
        if not leaving and not self._running and not chunks:
            return None
        return StepPlan(tuple(Leave(answer.id, remember=answer.stopped) for answer in leaving),
                        frozenset(answer.id for answer in self._running), tuple(chunks))

    def _admit_waiting(self) -> None:
        admitted = [answer.group.extent for answer in self._running]
        admitted += [group.extent for group in self._prefilling for _ in range(group.rows)]
        waiting = list(self._waiting)
        for index in self.admission.choose(waiting, admitted):
            group = waiting[index]
            self._waiting.remove(group)
            try:
                cached = self.runner.admit(NewPrompt(tuple(answer.id for answer in group.answers),
                                                     dataclasses.replace(group.request, image_rows=group.images)))
            except Exception as exc:  # noqa: BLE001 - this request's inputs (the runner says what); the others go on
                self._fail(group.answers, exc)
                continue
            group.images = ()
            group.prefilled = group.cached_tokens = cached
            group.admitted_at = time.monotonic()
            for answer in group.answers:
                answer.state = _State.PREFILL
                answer.detokenizer = IncrementalDetokenizer(self.tokenizer)
                answer.stops = StopStrings(group.request.sampling.stop_strings)
            self._prefilling.append(group)

    def _chunks(self, decode_rows: int) -> list[Chunk]:
        """This step's prefill chunks: the token budget left after the decode rows, shared equally by the first
        prompts in admission order (each gets at least MIN_PREFILL_CHUNK)."""
        if not self._prefilling:
            return []
        budget = max(self.max_step_tokens - decode_rows, MIN_PREFILL_CHUNK)
        groups = self._prefilling[:max(1, budget // MIN_PREFILL_CHUNK)]
        share = budget // len(groups)
        return [Chunk(group.id, min(group.prefilled + share, group.prompt_len)) for group in groups]

    # -- after a step ---------------------------------------------------------------------------------------------

    def update(self, plan: StepPlan, result: StepResult) -> None:
        """Takes in what the step of `plan` computed: the tokens as text and events, the answers that ended."""
        now = time.monotonic()
        answers = {answer.id: answer for answer in self._running}
        answers.update((answer.id, answer) for group in self._prefilling for answer in group.answers)
        self._kv_bytes = result.kv_bytes
        self._advance(plan, result)
        timed = []
        for sampled in result.sampled:
            answer = answers.get(sampled.id)
            if answer is None or answer.state is _State.DONE:
                continue
            delta, reason = self._text(answer, sampled)
            answer.generated += 1
            self._put(answer, delta)
            timed.append((answer.group.arrival, answer.last_token_at, delta, answer.group.request.adapter))
            answer.last_token_at = now
            if answer.first_token_at is None:
                answer.first_token_at = now
            if reason is not None:
                answer.stopped = sampled.ended is None  # a stop string: the runner still has its row
                self._finish([answer], reason)
        for answer_id, exc in result.failed:
            answer = answers.get(answer_id)
            if answer is not None and answer.state is not _State.DONE:
                # A prompt that failed before its fork fails with all its answers.
                self._fail(answer.group.answers if answer.state is _State.PREFILL else [answer], exc)
        left = {s.id for s in result.sampled if s.ended is not None} | {answer_id for answer_id, _ in result.failed}
        self._running = [answer for answer in self._running if answer.id not in left]
        self._prefilling = [group for group in self._prefilling if group.prefilling]
        if self.observer is not None:
            self.observer.on_step(result.report)
            self.observer.on_tokens(timed, now)
            self.observer.on_schedule(self.load())

    def _advance(self, plan: StepPlan, result: StepResult) -> None:
        """Each planned chunk's prompt advanced to the chunk's end, or forked: its answers now have rows."""
        completed = set(result.completed)
        failed = {answer_id for answer_id, _ in result.failed}
        groups = {group.id: group for group in self._prefilling}
        for chunk in plan.prefill:
            group = groups.get(chunk.prompt)
            if group is None or not group.prefilling:
                continue
            if chunk.prompt in completed:
                group.prefilled = chunk.end
                for answer in group.answers:
                    answer.state = _State.RUNNING
                self._running += group.answers
            elif chunk.prompt not in failed:
                group.prefilled = chunk.end

    def _text(self, answer: _Answer, sampled: Sampled) -> tuple[TokenDelta, FinishReason | None]:
        """The text the token completes (held back while it may start a stop string) and the finish it causes."""
        reason = sampled.ended
        text, hit = ("", False) if sampled.token == self.stop_token_id else answer.stops.feed(
            answer.detokenizer.add(sampled.token))
        if hit:
            reason = FinishReason.STOP
        elif reason is not None:
            # Generation ends: text held back inside a multi-byte character, then any held back as the possible start
            # of a stop string, are the answer's end, unless they complete a stop string.
            more, hit = answer.stops.feed(answer.detokenizer.flush())
            text += more if hit else more + answer.stops.flush()
            reason = FinishReason.STOP if hit else reason
        report = (sampled.logprobs,) if sampled.logprobs is not None else ()
        return TokenDelta((sampled.token,), text, report, answer.index), reason

    def abort(self, exc: BaseException) -> None:
        """After a step that raised (a bug in its bookkeeping: nothing in the batch can be trusted): every running
        and prefilling request fails with BatchFaultError, and the runner starts afresh."""
        error = batch_fault(exc, len(self._running))
        lost = [answer.id for answer in self._running] + [group.id for group in self._prefilling]
        self.runner.reset()
        self.update(StepPlan(), StepResult(failed=[(answer_id, error) for answer_id in lost]))

    def close(self) -> None:
        """Ends every request not yet finished with FINISH_REASON_CANCELLED; the runner starts afresh."""
        for group in self._waiting:
            self._finish(group.answers, FinishReason.CANCELLED)
        for answer in self._running:
            if answer.state is not _State.DONE:
                self._finish([answer], FinishReason.CANCELLED)
        for group in self._prefilling:
            if group.prefilling:
                self._finish(group.answers, FinishReason.CANCELLED)
        self._waiting.clear()
        self._running, self._prefilling = [], []
        self.runner.reset()
        self._kv_bytes = 0

    # -- ending answers -------------------------------------------------------------------------------------------

    def _finish(self, answers: list[_Answer], reason: FinishReason) -> None:
        now = time.monotonic()
        for answer in answers:
            group = answer.group
            self._end(answer)
            timing = Timing(group.arrival, group.admitted_at, answer.first_token_at, now)
            usage = Usage(group.prompt_len, answer.generated, group.cached_tokens)
            self._put(answer, Finish(reason, usage, answer.index, timing))

    def _fail(self, answers: list[_Answer], exc: BaseException) -> None:
        for answer in answers:
            self._end(answer)
            self._put(answer, exc)

    @staticmethod
    def _end(answer: _Answer) -> None:
        answer.state = _State.DONE
        answer.group.images = ()

    def _put(self, answer: _Answer, event: Event | BaseException) -> None:
        answer.group.queue.put_nowait(event)
        if isinstance(event, Finish) and self.observer is not None:
            # The prompt is the request's, counted once (with answer 0), as OpenAI's usage counts it.
            first = event.index == 0
            self.observer.on_finish(event.reason.value, event.usage.prompt_tokens if first else 0,
                                    event.usage.cached_prompt_tokens if first else 0, answer.group.request.adapter)
