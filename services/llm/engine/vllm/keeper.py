"""Keeps vLLM's `AsyncLLM` serving: starts it with the LoRA adapters loaded, watches it, and starts a new one when its
engine core died.

vLLM's engine core and workers are processes `AsyncLLM` spawns. When one dies (a crash, the OOM killer, a kill),
`AsyncLLM` fails every request in flight with `EngineDeadError` and stays dead (`errored`). The keeper notices within
`WATCH_INTERVAL_S` (on the event loop, with no request needed), calls `on_down` (the engine fails what is in flight
and tells its readiness listener), shuts the dead one down and starts another from the same arguments, retrying with
a growing delay while that fails, then calls `on_up`.

LoRA adapters: each adapter's language part is written once into a private temporary directory
(services.llm.engine.vllm.adapters) and loaded into every `AsyncLLM` the keeper starts before it serves (a copy vLLM
cannot load fails the start, not a request: vLLM loading an adapter on a request's first use and failing kills its
engine core). An adapter without a language part computes with the base here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from services.model.adapters import Adapter

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.2
# Delays between failed starts of a replacement: doubling from the first to the last.
RESTART_DELAYS_S = (1.0, 60.0)


class AsyncLLMKeeper:
    """One `AsyncLLM` at a time over `engine_args`; `llm` is the current one (None before `start`)."""

    def __init__(self, engine_args, adapters: Sequence[Adapter], stat_loggers: Callable[[], list],
                 on_down: Callable[[], None], on_up: Callable[[], None]):
        """`stat_loggers()`: the stat logger factories of a new `AsyncLLM`; `on_down` / `on_up` are called on the
        event loop's thread when the engine died (before its replacement starts) and when the replacement serves."""
        self.engine_args = engine_args
        self.adapters = tuple(adapters)
        self.stat_loggers = stat_loggers
        self.on_down, self.on_up = on_down, on_up
        self.llm = None
        self.restarting = False
        self.restarts = 0  # replacements started successfully
        # Adapter name -> its vLLM LoRARequest, or None where it computes with the base.
        self.loras: dict[str, object] = {}
        self._directory: Path | None = None
        self._watch: asyncio.Task | None = None

    @property
    def serving(self) -> bool:
        return self.llm is not None and not self.restarting and not self.llm.errored

    async def start(self) -> None:
        """Writes the adapters' copies, starts the first `AsyncLLM` (most of a minute on a CPU; the event loop serves
        on meanwhile) and the watch."""
        from vllm.lora.request import LoRARequest

        from services.llm.engine.vllm.adapters import write_language_copies

        if self.adapters:
            self._directory = Path(tempfile.mkdtemp(prefix="internvl-vllm-lora-"))
            copies = write_language_copies(self.adapters, self._directory)
            self.loras = {adapter.name: None for adapter in self.adapters}
            self.loras.update({name: LoRARequest(name, copy.lora_id, str(copy.path)) for name, copy in copies.items()})
        self.llm = await self._new_llm()
        self._watch = asyncio.get_running_loop().create_task(self._watch_and_restart(), name="vllm-keeper")

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)

    async def _new_llm(self):
        """A started `AsyncLLM` with every adapter loaded. Started in a thread that cancelling cannot stop: one that
        comes up after its caller was cancelled (the service closing) is shut down at once."""
        from vllm.v1.engine.async_llm import AsyncLLM

        starting = asyncio.ensure_future(asyncio.to_thread(AsyncLLM.from_engine_args, self.engine_args,
                                                           stat_loggers=self.stat_loggers()))
        try:
            llm = await asyncio.shield(starting)
        except asyncio.CancelledError:
            starting.add_done_callback(_shut_down_when_started)
            raise
        try:
            for lora in self.loras.values():
                if lora is not None:
                    await llm.add_lora(lora)
        except BaseException:
            llm.shutdown()
            raise
        return llm

    async def _watch_and_restart(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            if self.llm is not None and self.llm.errored:
                await self._restart()

    async def _restart(self) -> None:
        """Replaces the dead `AsyncLLM`; `restarting` (and so not `serving`) until the new one serves."""
        log.error("vLLM's engine core died; starting a new engine")
        self.restarting = True
        self.on_down()
        dead, self.llm = self.llm, None
        await asyncio.to_thread(dead.shutdown)
        delay, longest = RESTART_DELAYS_S
        while self.llm is None:
            try:
                self.llm = await self._new_llm()
            except Exception:  # whatever stopped it, the replica must come back or stay not ready
                log.exception("starting a new vLLM engine failed; trying again in %.0f s", delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, longest)
        self.restarting = False
        self.restarts += 1
        log.info("the new vLLM engine serves")
        self.on_up()


def _shut_down_when_started(starting: asyncio.Future) -> None:
    if starting.exception() is None:
        starting.result().shutdown()
