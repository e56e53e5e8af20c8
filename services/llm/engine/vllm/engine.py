"""The vLLM engine: vLLM's `AsyncLLM` in this process (its engine core and workers are processes it spawns) behind
our engine interface (services.llm.engine.api).

A request is rendered for vLLM (services.llm.engine.vllm.requests: one `<image>` per image, the rows as embeddings
keyed by our content keys), vLLM's expansion of the prompt is checked against ours token for token, and each of its
n answers runs as a vLLM request of its own (seed + i) in a task that turns vLLM's outputs into our events: one
`TokenDelta` per token (its text by our detokenizer and stop strings, its log-probabilities the model's raw
log-softmax), one `Finish` per answer with its usage (vLLM's `num_cached_tokens` as the prefix-cache hit).

A constraint goes to vLLM's xgrammar backend as the EBNF text our service compiled (services.llm.grammar
`constraint_ebnf`; the backend over our vocabulary is the plugin's); a LoRA adapter's language part as a
`LoRARequest` for the private copy the engine wrote at start-up (services.llm.engine.vllm.adapters), every adapter
loaded into vLLM before the engine serves.

Cancel (or the deadline) aborts the answers' vLLM requests (a request past its deadline before vLLM gave any output
of it fails DeadlineExceededError instead); a stop string found in the text ends its answer and aborts its request.
When vLLM's engine core dies (`EngineDeadError`), a watchdog fails every request in flight with `BatchFaultError`
(retryable), tells the engine's `readiness` listener False, starts a new `AsyncLLM` (refusing requests with
`NotReadyError` meanwhile), and tells it True once the new one serves.

`load()` and the observer's hooks come from vLLM's own statistics (services.llm.engine.vllm.stats).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from services.contract.errors import DeadlineExceededError, InternVLError, InvalidArgumentError, NotReadyError
from services.contract.finish import FinishReason
from services.llm.engine.api import BatchFaultError, Engine, EngineLoad, GenerationStream, StepReport
from services.llm.engine.events import EngineRequest, Finish, Timing, TokenDelta, Usage, check_image_rows
from services.llm.engine.vllm.answer_text import AnswerText
from services.llm.engine.vllm.keeper import AsyncLLMKeeper
from services.llm.engine.vllm.requests import (
    IMAGE_PLACEHOLDER,
    PromptFolder,
    engine_prompt,
    refusal,
    sampling_params,
    top_logprobs,
)
from services.llm.engine.vllm.stats import Occupancy, engine_load, kv_pool_bytes, logger_factory
from services.llm.grammar import constraint_ebnf
from services.model.adapters import Adapter

log = logging.getLogger(__name__)

_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.CANCELLED}


@dataclass(eq=False)
class _Request:
    """One submitted request: its events' queue and a task per answer."""

    id: str
    request: EngineRequest
    queue: asyncio.Queue
    arrival: float
    tasks: list[asyncio.Task] = field(default_factory=list)
    failed: bool = False  # an exception went to the queue: the stream is over
    deadline: asyncio.TimerHandle | None = None
    started: bool = False  # vLLM gave an output of one of its answers (it left vLLM's waiting queue)


class VLLMEngine(Engine):
    """vLLM's AsyncLLM over one checkpoint. `engine_args`: vLLM's AsyncEngineArgs (services.llm.engine.vllm.build);
    `adapters`: the LoRA adapters served beside the base."""

    def __init__(self, engine_args, tokenizer: PreTrainedTokenizerBase, *, stop_token_id: int, img_start_id: int,
                 img_context_id: int, img_end_id: int, dtype: torch.dtype, adapters: Sequence[Adapter] = ()):
        self.engine_args = engine_args
        self.tokenizer = tokenizer
        self.stop_token_id = stop_token_id
        self.image_ids = (img_start_id, img_context_id, img_end_id)
        self.dtype = dtype
        self.keeper = AsyncLLMKeeper(engine_args, adapters, lambda: [logger_factory(self._occupancy, self._on_step)],
                                     on_down=self._lost, on_up=self._started)
        self.start_seconds: float | None = None
        self._folder: PromptFolder | None = None
        self._occupancy = Occupancy()
        self._pool_bytes = 0
        self._prefix_lookups = self._prefix_hits = 0
        self._requests: set[_Request] = set()
        self._in_flight = 0  # answers (vLLM requests) not finished yet
        self._ids = itertools.count()
        # The image rows' checks and dtype conversion: torch kernels, off the event loop, on one thread of their own
        # (each thread that runs torch kernels gets an OpenMP team).
        self._inputs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-inputs")

    @property
    def llm(self):
        """vLLM's AsyncLLM now serving (None before start and while a new one starts)."""
        return self.keeper.llm

    # -- lifecycle ------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts vLLM's engine (its processes load the weights and size the KV pool: most of a minute on a CPU);
        the event loop serves on meanwhile."""
        started = time.monotonic()
        await self.keeper.start()
        self._started(tell=False)
        self.start_seconds = time.monotonic() - started
        log.info("vLLM engine started in %.1f s (KV pool %.1f MiB)", self.start_seconds, self._pool_bytes / 2**20)

    def _started(self, tell: bool = True) -> None:
        """A new AsyncLLM serves: its pool's size and its tokenizer's `<image>`."""
        self._pool_bytes = kv_pool_bytes(self.llm.vllm_config)
        placeholder = self.llm.renderer.get_tokenizer().encode(IMAGE_PLACEHOLDER, add_special_tokens=False)
        self._folder = PromptFolder(placeholder, *self.image_ids)
        if tell and self.readiness is not None:
            self.readiness(True)

    def _lost(self) -> None:
        """vLLM's engine died: what was in flight is lost (retryable), and this replica is not ready until a new one
        serves."""
        lost = BatchFaultError("the LLM server's engine (vLLM) failed and this request was lost; retry it (the "
                               "engine is being restarted)")
        for entry in list(self._requests):
            self._fail(entry, lost)
        if self.readiness is not None:
            self.readiness(False)

    async def close(self) -> None:
        requests = list(self._requests)
        for entry in requests:
            self._cancel(entry)
        await asyncio.gather(*(task for entry in requests for task in entry.tasks), return_exceptions=True)
        await self.keeper.close()
        self._inputs.shutdown(wait=False, cancel_futures=True)

    # -- the interface --------------------------------------------------------------------------------------------

    def load(self) -> EngineLoad:
        return engine_load(self._occupancy, self._pool_bytes, self._prefix_lookups, self._prefix_hits,
                           self._in_flight)

    def submit(self, request: EngineRequest) -> GenerationStream:
        if self.start_seconds is None:
            raise RuntimeError("engine not started")
        if not self.keeper.serving:
            raise NotReadyError("the LLM server's engine (vLLM) failed and is being restarted; retry on another "
                                "replica or shortly")
        problem = refusal(request)
        if problem is not None:
            raise problem
        entry = _Request(f"{request.request_id or 'req'}-{next(self._ids)}", request, asyncio.Queue(),
                         request.arrival or time.monotonic())
        loop = asyncio.get_running_loop()
        for index in range(request.sampling.answers):
            answer = _Answer(entry, index, AnswerText(self.tokenizer, request.sampling.stop_strings,
                                                      self.stop_token_id))
            task = loop.create_task(self._run(answer), name=f"{entry.id}-{index}")
            task.add_done_callback(lambda _, answer=answer: self._answer_done(answer))
            entry.tasks.append(task)
        self._in_flight += len(entry.tasks)
        self._requests.add(entry)
        if request.deadline is not None:
            entry.deadline = loop.call_later(max(0.0, request.deadline - time.monotonic()), self._expire, entry)
        return GenerationStream(entry.queue, lambda: self._cancel(entry), len(entry.tasks))

    def _cancel(self, entry: _Request) -> None:
        for task in entry.tasks:
            task.cancel()

    def _expire(self, entry: _Request) -> None:
        """Its deadline passed: one vLLM never started fails DeadlineExceededError (it waited in vLLM's queue), one
        that ran is cancelled (its answers end FINISH_REASON_CANCELLED)."""
        if not entry.started:
            self._fail(entry, DeadlineExceededError("the request's deadline passed while it waited in the LLM "
                                                    "server's queue; nothing of it was returned"))
        self._cancel(entry)

    def _answer_done(self, answer: _Answer) -> None:
        """An answer's task ended (also one cancelled before it ran): its finish is sent, its slot given back."""
        self._finish(answer, FinishReason.CANCELLED)  # a no-op when it finished or failed
        self._in_flight -= 1
        entry = answer.entry
        if all(task.done() for task in entry.tasks):
            self._requests.discard(entry)
            if entry.deadline is not None:
                entry.deadline.cancel()
        if self.observer is not None:
            self.observer.on_schedule(self.load())

    # -- one answer -----------------------------------------------------------------------------------------------

    async def _run(self, answer: _Answer) -> None:
        """Runs one answer as a vLLM request; its events (or its request's error) go to its request's queue."""
        entry = answer.entry
        try:
            lora = self._lora(entry.request.adapter)
            engine_input, grammar = await self._render(entry.request)
            params = sampling_params(entry.request, answer.index, self.stop_token_id, grammar)
            # vLLM's priority scheduling sorts by the value, lower first: ours (critical 1 < standard 2 < sheddable 3).
            outputs = self.llm.generate(engine_input, params, request_id=f"{entry.id}-{answer.index}",
                                        lora_request=lora, priority=int(entry.request.priority))
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    if self._deliver(answer, output):
                        break
        except asyncio.CancelledError:
            pass  # cancelled or past its deadline: its task's end sends FINISH_REASON_CANCELLED
        except Exception as exc:  # noqa: BLE001 - every failure ends this request's stream with a domain error
            self._fail(entry, self._domain_error(exc))

    def _lora(self, adapter: str):
        """vLLM's LoRARequest for `adapter` (None: the base computes it)."""
        if adapter and adapter not in self.keeper.loras:  # the service refuses it first (services.llm.intake)
            raise InternVLError(f"model {adapter!r} is not an adapter of this engine")
        return self.keeper.loras.get(adapter)

    async def _render(self, request: EngineRequest) -> tuple[dict, str | None]:
        """vLLM's engine input for `request`, checked (vLLM's expansion of the images gives back our prompt's ids),
        and its constraint's grammar (EBNF text) if it has one."""
        prompt, grammar = await asyncio.get_running_loop().run_in_executor(self._inputs, self._prepare, request)
        (engine_input,) = await self.llm.renderer.render_cmpl_async([prompt])
        if list(engine_input["prompt_token_ids"]) != list(request.prompt.token_ids):
            raise InternVLError("vLLM's expansion of this prompt's images differs from the original's token ids; "
                                "the request was not run")
        return engine_input, grammar

    def _prepare(self, request: EngineRequest) -> tuple[dict, str | None]:
        """The prompt for vLLM and the grammar, off the event loop (the rows are checked and converted here)."""
        check_image_rows(request.prompt.images, request.image_rows)
        constraint = request.sampling.constraint
        try:
            return engine_prompt(request, self._folder, self.dtype), (
                None if constraint is None else constraint_ebnf(constraint))
        except ValueError as exc:  # the prompt builder's images and ids disagree: ours to mend, not the caller's
            raise InternVLError(f"this prompt's images could not be given to vLLM ({exc})") from exc

    def _deliver(self, answer: _Answer, output) -> bool:
        """One vLLM output of the answer as events; True when the answer ended (finished, or a stop string)."""
        completion = output.outputs[0]
        now = time.monotonic()
        if answer.first_output is None:
            answer.first_output = now
            answer.entry.started = True
            answer.cached_tokens = output.num_cached_tokens or 0
            answer.admitted = _admitted(output, now)
            self._prefix_lookups += 1
            self._prefix_hits += answer.cached_tokens > 0
        ending = _REASONS.get(completion.finish_reason) if output.finished else None
        tokens, timed = list(completion.token_ids), []
        for position, token in enumerate(tokens):
            last = position == len(tokens) - 1
            text, reason = answer.text.add(token, ending if last else None)
            report = top_logprobs(completion.logprobs[position], token, answer.top_logprobs) \
                if answer.top_logprobs else None
            delta = TokenDelta((token,), text, (report,) if report is not None else (), answer.index)
            answer.generated += 1
            answer.entry.queue.put_nowait(delta)
            timed.append((answer.entry.arrival, answer.last_token, delta, answer.entry.request.adapter))
            answer.last_token = now
            if answer.first_token is None:
                answer.first_token = now
            if reason is not None:
                if self.observer is not None:
                    self.observer.on_tokens(timed, now)
                self._finish(answer, reason)
                return True
        if self.observer is not None and timed:
            self.observer.on_tokens(timed, now)
        if output.finished:
            self._finish(answer, ending or FinishReason.STOP)
            return True
        return False

    def _finish(self, answer: _Answer, reason: FinishReason) -> None:
        if answer.finished or answer.entry.failed:
            return
        answer.finished = True
        now = time.monotonic()
        usage = Usage(len(answer.entry.request.prompt), answer.generated, answer.cached_tokens)
        timing = Timing(answer.entry.arrival, answer.admitted, answer.first_token, now)
        answer.entry.queue.put_nowait(Finish(reason, usage, answer.index, timing))
        if self.observer is not None:
            # The prompt is the request's, counted once (with answer 0), as OpenAI's usage counts it.
            first = answer.index == 0
            self.observer.on_finish(reason.value, usage.prompt_tokens if first else 0,
                                    usage.cached_prompt_tokens if first else 0, answer.entry.request.adapter)

    def _fail(self, entry: _Request, error: BaseException) -> None:
        """Ends the request's stream with `error` (once) and stops its other answers."""
        if entry.failed:
            return
        entry.failed = True
        entry.queue.put_nowait(error)
        for task in entry.tasks:
            if task is not asyncio.current_task():
                task.cancel()

    def _domain_error(self, exc: BaseException) -> BaseException:
        """What a caller is told when vLLM failed its request."""
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(exc, InternVLError):
            return exc
        if isinstance(exc, EngineDeadError):  # the keeper restarts the engine
            return BatchFaultError("the LLM server's engine (vLLM) failed and this request was lost; retry it (the "
                                   "engine is being restarted)")
        if isinstance(exc, VLLMClientError | ValueError):
            return InvalidArgumentError(f"the LLM server's engine (vLLM) refused the request: {exc}")
        log.error("a vLLM request failed: %s: %s", type(exc).__name__, exc)
        return InternVLError(f"the LLM server failed computing this request ({type(exc).__name__}); other requests "
                             "are unaffected")

    # -- statistics -----------------------------------------------------------------------------------------------

    def _on_step(self, report: StepReport) -> None:
        if self.observer is not None:
            self.observer.on_step(report)
            self.observer.on_schedule(self.load())


@dataclass(eq=False)
class _Answer:
    entry: _Request
    index: int
    text: AnswerText
    generated: int = 0
    cached_tokens: int = 0
    finished: bool = False
    first_output: float | None = None
    admitted: float | None = None
    first_token: float | None = None
    last_token: float | None = None

    @property
    def top_logprobs(self) -> int:
        return self.entry.request.sampling.top_logprobs


def _admitted(output, now: float) -> float | None:
    """When vLLM first scheduled the request (its engine core's monotonic clock, the same on one host)."""
    scheduled = getattr(output.metrics, "scheduled_ts", 0.0) if output.metrics is not None else 0.0
    return scheduled if 0 < scheduled <= now else None
