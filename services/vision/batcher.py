"""Micro-batching of vision tiles across concurrent requests.

Each request hands in its tiles ([n, 3, H, W]) and awaits its own embeddings ([n, ...]). A single worker task
collects queued tiles into one batch of at most ``max_batch_tiles``, waiting at most ``max_wait_s`` after the
oldest queued tile arrived for the batch to fill, and runs the encoder on it in one dedicated thread: torch
releases the GIL during the forward, so the event loop keeps serving while the accelerator works, and the
model only ever sees one batch at a time. A request larger than a batch is split over several batches and
its rows are put back together in order.

Each request names the adapter slot its tiles are encoded with (0: the base model; see services.model.lora):
tiles of different adapters share a batch, and the encoder gets each tile's slot.

Transport-free and model-free: the encoder is any ``Callable[[Tensor, list[int]], Tensor]`` that maps [B, ...]
inputs and B slots to [B, ...] outputs row by row, so tests drive it with a fake.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from services.contract.errors import NotReadyError
from services.runtime import tracing

log = logging.getLogger(__name__)

Encoder = Callable[[torch.Tensor, list[int]], torch.Tensor]


@dataclass(frozen=True)
class BatchStats:
    """One encoder forward, for metrics and tests."""

    tiles: int
    # Distinct requests whose tiles were in the batch.
    requests: int
    # Wall time of the forward (including the concatenation of inputs) in the worker thread.
    seconds: float


class _Job:
    """One request's tiles, consumed batch by batch, and the future its caller awaits."""

    __slots__ = ("batch_spans", "enqueued_at", "future", "parts", "pixels", "scheduled", "slot")

    def __init__(self, pixels: torch.Tensor, future: asyncio.Future, enqueued_at: float, slot: int) -> None:
        self.pixels = pixels
        self.slot = slot
        self.future = future
        self.enqueued_at = enqueued_at
        # The spans of the shared batches its tiles ran in (tracing): what its own encode span links to.
        self.batch_spans: list = []
        # Tiles already handed to a batch; the rest are still queued.
        self.scheduled = 0
        # Output rows received so far, in tile order.
        self.parts: list[torch.Tensor] = []

    @property
    def total(self) -> int:
        return self.pixels.shape[0]

    @property
    def remaining(self) -> int:
        return self.total - self.scheduled


class MicroBatcher:
    """Queues tiles from concurrent callers and encodes them together. ``start()`` it inside a running loop."""

    def __init__(self, encoder: Encoder, *, max_batch_tiles: int, max_wait_s: float,
                 on_batch: Callable[[BatchStats], None] | None = None, history: int = 1024) -> None:
        if max_batch_tiles < 1:
            raise ValueError(f"max_batch_tiles must be >= 1, got {max_batch_tiles}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self._encoder = encoder
        self.max_batch_tiles = max_batch_tiles
        self.max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._pending: collections.deque[_Job] = collections.deque()
        self._queued_tiles = 0
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False

        # Counters; they only grow. ``history`` keeps the most recent batches for tests and debugging.
        self.batches = 0
        self.tiles_encoded = 0
        # Queued tiles dropped before reaching a batch because their caller was cancelled (never encoded).
        self.tiles_cancelled = 0
        self.history: collections.deque[BatchStats] = collections.deque(maxlen=history)

    @property
    def queued_tiles(self) -> int:
        """Tiles waiting for a batch (the queue depth)."""
        return self._queued_tiles

    def start(self) -> None:
        if self._worker is not None:
            raise RuntimeError("the batcher is already started")
        self._wakeup = asyncio.Event()
        # One thread: the encoder runs one batch at a time, and CUDA state stays on one thread.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vision-encoder")
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="vision-batcher")

    async def encode(self, pixels: torch.Tensor, slot: int = 0) -> torch.Tensor:
        """Encodes ``pixels`` [n, ...] with adapter ``slot`` together with whatever else is queued; returns this
        request's n rows.

        Cancelling the caller drops its tiles that have not reached a batch yet.
        """
        if self._closed or self._worker is None:
            raise NotReadyError("the vision encoder is not running")
        if pixels.dim() < 1 or pixels.shape[0] == 0:
            raise ValueError(f"expected [n >= 1, ...] tiles, got shape {tuple(pixels.shape)}")
        loop = asyncio.get_running_loop()
        job = _Job(pixels, loop.create_future(), loop.time(), slot)
        self._pending.append(job)
        self._queued_tiles += job.total
        self._wakeup.set()
        try:
            rows = await job.future
            # The request's wait and the batches it joined: a link to each (a batch serves several traces).
            tracing.record_span("vision.encode", job.enqueued_at, loop.time(),
                                {"internvl.tiles": job.total, "internvl.batches": len(job.batch_spans)},
                                links=job.batch_spans)
            return rows
        finally:
            if job.remaining and job in self._pending:  # cancelled before all its tiles ran (_fail dequeues)
                self._pending.remove(job)
                self._queued_tiles -= job.remaining
                self.tiles_cancelled += job.remaining

    async def close(self) -> None:
        """Stops taking work, fails what is queued, and waits for a running forward to finish."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(NotReadyError("the vision encoder is shutting down"))
        self._queued_tiles = 0
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, wait=True)

    # ------------------------------------------------------------------------------------------- worker

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._wait_for_batch(loop)
                pieces = self._take()
                if pieces:
                    await self._run_batch(loop, pieces)
        except Exception as exc:  # a bug here would leave every caller waiting forever: fail them instead
            log.exception("vision batcher stopped")
            self._closed = True
            for job in list(self._pending):
                self._fail(job, exc)
            raise

    async def _wait_for_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Returns once a full batch is queued or the oldest queued tile has waited ``max_wait_s``."""
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        while self._pending and self._queued_tiles < self.max_batch_tiles:
            timeout = self._pending[0].enqueued_at + self.max_wait_s - loop.time()
            if timeout <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                return

    def _take(self) -> list[tuple[_Job, int, int]]:
        """Up to ``max_batch_tiles`` queued tiles, oldest request first: (job, start, end) slices."""
        pieces: list[tuple[_Job, int, int]] = []
        room = self.max_batch_tiles
        while self._pending and room:
            job = self._pending[0]
            if job.future.done():  # its caller went away before encode()'s cleanup ran
                self._pending.popleft()
                self._queued_tiles -= job.remaining
                self.tiles_cancelled += job.remaining
                continue
            n = min(room, job.remaining)
            pieces.append((job, job.scheduled, job.scheduled + n))
            job.scheduled += n
            self._queued_tiles -= n
            room -= n
            if not job.remaining:
                self._pending.popleft()
        return pieces

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, pieces: list[tuple[_Job, int, int]]) -> None:
        inputs = [job.pixels[start:end] for job, start, end in pieces]
        tiles = sum(x.shape[0] for x in inputs)
        started = loop.time()
        try:
            output, seconds, joined = await loop.run_in_executor(self._executor, self._forward, inputs, tiles, pieces)
        except asyncio.CancelledError:  # close(): the forward finishes in its thread, its callers get an error
            for job, _, _ in pieces:
                self._fail(job, NotReadyError("the vision encoder is shutting down"))
            raise
        except Exception as exc:
            log.exception("vision encoder failed on a batch of %d tiles", tiles)
            for job, _, _ in pieces:
                self._fail(job, exc)
            return
        offset = 0
        for job, start, end in pieces:
            n = end - start
            if not job.future.done():
                if end < job.total:
                    job.parts.append(output[offset:offset + n])
                else:  # its last tiles: every earlier batch of it succeeded, or its future would be done
                    job.future.set_result(joined[id(job)] if job.parts else output[offset:offset + n])
            offset += n
        stats = BatchStats(tiles=tiles, requests=len({id(job) for job, _, _ in pieces}), seconds=seconds)
        # A root span of its own (the batcher's task has no request context): the requests link to it.
        batch = tracing.record_span("vision.encode_batch", started, loop.time(),
                                    {"internvl.tiles": tiles, "internvl.requests": stats.requests})
        for job in {id(job): job for job, _, _ in pieces}.values():
            job.batch_spans.append(batch)
        self.batches += 1
        self.tiles_encoded += tiles
        self.history.append(stats)
        if self._on_batch is not None:
            self._on_batch(stats)

    def _forward(self, inputs: list[torch.Tensor], tiles: int,
                 pieces: list[tuple[_Job, int, int]]) -> tuple[torch.Tensor, float, dict[int, torch.Tensor]]:
        """Runs in the encoder thread: (output, seconds of the forward, the whole output of each request split
        over several batches that this batch completes, by ``id(job)``).

        Every torch kernel of the batcher runs here, none on the event loop's thread: concatenating tens of MiB
        would stall the loop, and on CPU a torch kernel on another thread gives it an OpenMP team of its own,
        which makes libgomp throttle the spin-waiting of this thread's team in every later forward.
        """
        started = time.perf_counter()
        batch = inputs[0] if len(inputs) == 1 else torch.cat(inputs)
        output = self._encoder(batch, [job.slot for job, start, end in pieces for _ in range(end - start)])
        if output.shape[0] != tiles:
            raise RuntimeError(f"encoder returned {output.shape[0]} rows for {tiles} tiles")
        seconds = time.perf_counter() - started
        joined: dict[int, torch.Tensor] = {}
        offset = 0
        for job, start, end in pieces:
            # ``parts`` only changes on the loop's thread, which is waiting for this call.
            if end == job.total and job.parts and not job.future.done():
                joined[id(job)] = torch.cat([*job.parts, output[offset:offset + end - start]])
            offset += end - start
        return output, seconds, joined

    def _fail(self, job: _Job, exc: BaseException) -> None:
        if not job.future.done():
            job.future.set_exception(exc)
        if job.remaining and job in self._pending:
            self._pending.remove(job)
            self._queued_tiles -= job.remaining
            job.scheduled = job.total
