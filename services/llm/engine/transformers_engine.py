"""The transformers engine: continuous batching on transformers' language model, one step at a time.

A `Scheduler` (services.llm.engine.scheduler) decides each step on the event loop's thread and a `ModelRunner`
(services.llm.engine.runner) runs it in the engine's one worker thread; they meet at the step contract
(services.llm.engine.step). This module is the loop between them and the `Engine` interface around it:

    plan = scheduler.plan()                  # loop thread: drop what is gone, admit, pick the prefill chunks
    result = runner.step(plan)               # worker thread: decode forward, prefill forward, sampling
    scheduler.update(plan, result)           # loop thread: text, events, finishes

A step that raises (a bug in its bookkeeping, not a fault of one request: those the runner confines) fails every
running and prefilling request with `BatchFaultError`; the runner starts with an empty batch and the engine serves on.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from services.llm.engine.admission import Admission
from services.llm.engine.api import Engine, EngineLoad, EngineObserver, GenerationStream
from services.llm.engine.batch import COLUMN_SLACK
from services.llm.engine.events import EngineRequest
from services.llm.engine.memory import default_kv_budget_bytes
from services.llm.engine.prefix_cache import PrefixCache
from services.llm.engine.runner import ModelRunner
from services.llm.engine.scheduler import Scheduler
from services.model.lora import AdapterSlots

log = logging.getLogger(__name__)


class TransformersEngine(Engine):
    """The scheduler over one transformers causal LM (Qwen2 or Llama layout) and its model runner."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, stop_token_id: int,
                 img_context_id: int, max_context_tokens: int, max_batch_size: int = 32, max_step_tokens: int = 512,
                 prefix_cache_budget_bytes: int = 0, kv_budget_bytes: int = 0, adapters: AdapterSlots | None = None):
        """`kv_budget_bytes` 0: services.llm.engine.memory's default, from the memory free now."""
        self.runner = ModelRunner(model, stop_token_id=stop_token_id, img_context_id=img_context_id,
                                  max_context_tokens=max_context_tokens,
                                  prefix_cache_budget_bytes=prefix_cache_budget_bytes, adapters=adapters)
        self.dtype = model.dtype
        self.stop_token_id = stop_token_id
        if not kv_budget_bytes:
            kv_budget_bytes = default_kv_budget_bytes(self.runner.device, prefix_cache_budget_bytes)
        admission = Admission(kv_budget_bytes, self.runner.kv_bytes_per_token, max_batch_size,
                              max_bypass=max_batch_size, spare_columns=COLUMN_SLACK)
        self._wake = asyncio.Event()
        self.scheduler = Scheduler(self.runner, tokenizer, admission, stop_token_id=stop_token_id,
                                   max_step_tokens=max_step_tokens, wake=self._wake.set)
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None

    # The runner's figures and parts, which tests and the benchmark read.
    @property
    def observer(self) -> EngineObserver | None:
        return self.scheduler.observer

    @observer.setter
    def observer(self, observer: EngineObserver | None) -> None:
        self.scheduler.observer = observer

    @property
    def adapters(self) -> AdapterSlots | None:
        return self.runner.adapters

    @property
    def prefix_cache(self) -> PrefixCache:
        return self.runner.prefix_cache

    @property
    def kv_bytes_per_token(self) -> int:
        return self.runner.kv_bytes_per_token

    @property
    def steps(self) -> int:
        return self.runner.steps

    @property
    def max_batch_size_seen(self) -> int:
        """The most rows one decode forward has had."""
        return self.runner.max_batch_size_seen

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
        self.scheduler.close()

    def load(self) -> EngineLoad:
        return self.scheduler.load()

    def submit(self, request: EngineRequest) -> GenerationStream:
        if self._task is None:
            raise RuntimeError("engine not started")
        return self.scheduler.submit(request)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            plan = self.scheduler.plan()
            if plan is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                result = await loop.run_in_executor(self._executor, self.runner.step, plan)
            except Exception as exc:  # a bug in the step's bookkeeping: nothing in the batch can be trusted
                log.exception("engine step failed; rebuilding the batch")
                self.scheduler.abort(exc)
            else:
                self.scheduler.update(plan, result)
