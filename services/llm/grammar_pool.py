"""Structured-output grammars compiled within a time budget, in worker processes killed when they overrun it.

xgrammar compiles a grammar against the whole vocabulary, and the cost is not bounded by the constraint's
size: on the tiny checkpoint's 151k-token vocabulary (2 loaded cores) the 17-character regex
`(.{1,200}){1,200}` took 11.7 s, and a 27 KB JSON schema of 600 optional string properties 51 s and 400 MB,
while ordinary schemas take milliseconds. Writing a constraint's grammar as EBNF text (`grammar_text`) is fast
and stays here, so a constraint without a grammar is refused without a worker; compiling that text against the
vocabulary is what can explode. A compile in a thread cannot be stopped: a bounded thread pool could refuse
the request at the budget but would keep computing (and holding the memory) for the minute, and the next
compiles would queue behind it. So each compile runs in a worker process (services.llm.grammar_worker) that is
killed (SIGKILL) when it passes --grammar-compile-timeout-s, and the request is refused with INVALID_ARGUMENT
naming the budget. The compiled grammar comes back as xgrammar's JSON serialisation (never pickle) and is
rebuilt here against the service's own TokenizerInfo (about 0.1 s for a 5 MB grammar, in the default
executor).

`WORKERS` processes compile concurrently (started on first use); a compile waits for a free one at most the
budget of the compile it waits behind (plus a respawn, started at once when a worker is killed), so a
pathological constraint delays the others by no more than the budget and never touches the model's step (the
engine's thread). Grammars compiled here are kept (`CACHE_BYTES`, least recently used out), so a schema many
requests share is compiled once. The vLLM engine compiles the same EBNF again in vLLM's structured-output
manager, asynchronously to its step; only constraints that compiled here within the budget get there.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import sys

import xgrammar

from services.contract.constraint import Constraint
from services.contract.errors import InternalError, InvalidArgumentError
from services.llm import grammar_worker
from services.llm.grammar import Grammars, grammar_text

log = logging.getLogger(__name__)

WORKERS = 2
CACHE_BYTES = 256 * 1024 * 1024
# A worker's start (python, xgrammar and torch imports, the TokenizerInfo): slow on a loaded machine, but bounded.
START_TIMEOUT_S = 120.0


class _Worker:
    """One compile process and its framed pipes."""

    def __init__(self, process: asyncio.subprocess.Process):
        self.process = process

    @classmethod
    async def start(cls, setup: bytes) -> _Worker:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.llm.grammar_worker", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=env)
        worker = cls(process)
        try:
            ready = await asyncio.wait_for(worker.call(setup), START_TIMEOUT_S)
        except BaseException:
            worker.kill()
            raise
        if not ready.get("ready"):
            worker.kill()
            raise RuntimeError(f"the grammar worker answered {ready!r} to its setup")
        return worker

    async def call(self, frame: bytes) -> dict:
        """Sends one frame and reads the answer (EOFError / IncompleteReadError when the process died)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(frame)
        await self.process.stdin.drain()
        length = grammar_worker.decode_length(await self.process.stdout.readexactly(4))
        return json.loads(await self.process.stdout.readexactly(length))

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


class GrammarPool:
    """Compiles `Constraint`s for `grammars`' tokenizer in `WORKERS` processes, each compile within `timeout_s`."""

    def __init__(self, grammars: Grammars, timeout_s: float):
        self.grammars = grammars
        self.timeout_s = timeout_s
        # Each slot: a worker starting or started (a task), or None (none yet: started by the first compile that
        # takes the slot), taken by one compile at a time. The queue itself is made on first use.
        self._slots: asyncio.Queue[asyncio.Task[_Worker] | None] | None = None
        self._all: set[asyncio.Task[_Worker]] = set()
        self._cache: collections.OrderedDict[Constraint, xgrammar.CompiledGrammar] = collections.OrderedDict()
        self._cached_bytes = 0
        self._setup: bytes | None = None
        self.timeouts = 0  # compiles refused for overrunning the budget

    async def compile(self, constraint: Constraint) -> xgrammar.CompiledGrammar:
        """The compiled grammar of `constraint`. Raises InvalidArgumentError when it has none or takes longer than
        the budget, InternalError when a worker cannot start or dies."""
        cached = self._cache.get(constraint)
        if cached is not None:
            self._cache.move_to_end(constraint)
            return cached
        # The grammar's text first, here (fast; a constraint without one is refused without a worker).
        loop = asyncio.get_running_loop()
        ebnf = await loop.run_in_executor(None, grammar_text, constraint)
        slots = await self._ready_slots()
        task = await slots.get() or self._spawn()
        try:
            worker = await asyncio.shield(task)  # a cancelled request leaves the worker starting for the next one
        except asyncio.CancelledError:
            slots.put_nowait(task)
            raise
        except Exception:
            log.exception("a grammar compile worker failed to start")
            slots.put_nowait(self._spawn())
            raise InternalError("the grammar compiler is unavailable") from None
        killed = True
        try:
            answer = await asyncio.wait_for(worker.call(grammar_worker.encode_frame(
                {"ebnf": ebnf, "kind": constraint.kind.value})), self.timeout_s)
            killed = False
        except TimeoutError:
            self.timeouts += 1
            log.warning("a %s constraint overran the %s s compile budget; its worker is killed",
                        constraint.kind.value, self.timeout_s)
            raise InvalidArgumentError(
                f"{constraint.kind.value}: the constraint took longer than {self.timeout_s:g} s to compile "
                "(--grammar-compile-timeout-s); simplify it (fewer optional properties, smaller repetition "
                "bounds)") from None
        except (EOFError, asyncio.IncompleteReadError, ConnectionError):
            log.error("a grammar compile worker died (exit status %s)", worker.process.returncode)
            raise InternalError("the grammar compiler failed") from None
        finally:
            # Killed whenever its answer was not read (an overrun, a cancelled request, a dead pipe): its next frame
            # would belong to no one.
            if killed:
                worker.kill()
                self._all.discard(task)
                task = self._spawn()
            slots.put_nowait(task)
        if "error" in answer:
            raise InvalidArgumentError(answer["error"])
        compiled = await loop.run_in_executor(
            None, xgrammar.CompiledGrammar.deserialize_json, answer["grammar"], self.grammars.tokenizer_info)
        self._remember(constraint, compiled)
        return compiled

    async def _ready_slots(self) -> asyncio.Queue[asyncio.Task[_Worker] | None]:
        if self._slots is None:
            # The vocabulary is built once (about a second for 150k tokens), off the loop.
            vocabulary, metadata = await asyncio.get_running_loop().run_in_executor(
                None, lambda: self.grammars.vocabulary)
            if self._slots is None:
                self._setup = grammar_worker.encode_frame({"vocabulary": vocabulary, "metadata": metadata})
                self._slots = asyncio.Queue()
                for _ in range(WORKERS):
                    self._slots.put_nowait(None)
        return self._slots

    def _spawn(self) -> asyncio.Task[_Worker]:
        assert self._setup is not None
        task = asyncio.ensure_future(_Worker.start(self._setup))
        self._all.add(task)
        return task

    def _remember(self, constraint: Constraint, compiled: xgrammar.CompiledGrammar) -> None:
        size = compiled.memory_size_bytes
        if size > CACHE_BYTES:
            return
        self._cache[constraint] = compiled
        self._cached_bytes += size
        while self._cached_bytes > CACHE_BYTES:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.memory_size_bytes

    async def close(self) -> None:
        """Kills every worker and waits for them."""
        tasks, self._all = self._all, set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):  # cancelled or failed to start: nothing left to kill
                worker = await task
                worker.kill()
                await worker.process.wait()
