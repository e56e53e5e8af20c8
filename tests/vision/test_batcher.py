"""The micro-batcher with a fake encoder: batching across requests, limits, splitting, failures, cancellation."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from services.contract.errors import NotReadyError
from services.vision.batcher import MicroBatcher


class FakeEncoder:
    """Maps each input row r to [r * 10, r * 10 + 1] and records the batches it saw (in its thread)."""

    def __init__(self, delay_s: float = 0.0, fail_on: int | None = None):
        self.delay_s = delay_s
        self.fail_on = fail_on  # a tile value that makes the whole batch fail
        self.batches: list[list[float]] = []
        self.threads: set[str] = set()

    def __call__(self, batch: torch.Tensor, slots: list[int]) -> torch.Tensor:
        self.threads.add(threading.current_thread().name)
        self.batches.append(batch[:, 0].tolist())
        if self.delay_s:
            time.sleep(self.delay_s)  # like a GPU forward: the loop must stay free meanwhile
        if self.fail_on is not None and (batch[:, 0] == self.fail_on).any():
            raise RuntimeError("CUDA out of memory (fake)")
        return torch.stack([batch[:, 0] * 10, batch[:, 0] * 10 + 1], dim=1)


def tiles(*values: float) -> torch.Tensor:
    """A request's tiles: one row per tile, its first element identifying it."""
    return torch.tensor([[v, 0.0] for v in values])


def expected(*values: float) -> torch.Tensor:
    return torch.tensor([[v * 10, v * 10 + 1] for v in values])


async def started(encoder, **kwargs) -> MicroBatcher:
    batcher = MicroBatcher(encoder, **{"max_batch_tiles": 8, "max_wait_s": 0.05, **kwargs})
    batcher.start()
    return batcher


@pytest.mark.asyncio
async def test_concurrent_requests_share_a_batch_and_get_their_own_rows():
    encoder = FakeEncoder()
    seen = []
    batcher = await started(encoder, max_batch_tiles=16, max_wait_s=0.2, on_batch=seen.append)
    try:
        requests = [tiles(1, 2, 3), tiles(4), tiles(5, 6), tiles(7, 8, 9, 10)]
        results = await asyncio.gather(*(batcher.encode(r) for r in requests))
        for request, result in zip(requests, results, strict=True):
            assert torch.equal(result, expected(*request[:, 0].tolist()))
        assert encoder.batches == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
        assert (batcher.batches, batcher.tiles_encoded) == (1, 10)
        assert [(s.tiles, s.requests) for s in seen] == [(10, 4)]
        assert list(batcher.history) == seen
        assert encoder.threads and all(name.startswith("vision-encoder") for name in encoder.threads)
    finally:
        await batcher.close()


@pytest.mark.asyncio
async def test_a_full_batch_goes_without_waiting_and_the_rest_follows():
    encoder = FakeEncoder()
    # A wait long enough that only a full batch can explain a prompt answer.
    batcher = await started(encoder, max_batch_tiles=4, max_wait_s=30)
    try:
        began = time.perf_counter()
        first = await asyncio.wait_for(
            asyncio.gather(batcher.encode(tiles(1, 2)), batcher.encode(tiles(3, 4))), timeout=5)
        assert time.perf_counter() - began < 5
        assert [r[:, 0].tolist() for r in first] == [[10, 20], [30, 40]]
        assert encoder.batches == [[1, 2, 3, 4]]
    finally:
        await batcher.close()


@pytest.mark.asyncio
async def test_a_lone_request_waits_at_most_max_wait():
    encoder = FakeEncoder()
    batcher = await started(encoder, max_batch_tiles=64, max_wait_s=0.1)
    try:
        began = time.perf_counter()
        result = await batcher.encode(tiles(1))
        waited = time.perf_counter() - began
        assert torch.equal(result, expected(1))
        assert 0.09 <= waited < 1.0, waited
    finally:
        await batcher.close()


@pytest.mark.asyncio
async def test_zero_wait_runs_at_once():
    encoder = FakeEncoder()
    batcher = await started(encoder, max_batch_tiles=64, max_wait_s=0)
    try:
        began = time.perf_counter()
        await batcher.encode(tiles(1))
        assert time.perf_counter() - began < 0.5
    finally:
        await batcher.close()


@pytest.mark.asyncio
async def test_large_request_is_split_and_reassembled_in_order():
    encoder = FakeEncoder()
    batcher = await started(encoder, max_batch_tiles=4, max_wait_s=0.01)
    try:
        values = list(range(1, 12))  # 11 tiles: 4 + 4 + 3
        result = await batcher.encode(tiles(*values))
        assert torch.equal(result, expected(*values))
        assert encoder.batches == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]
        assert all(len(b) <= 4 for b in encoder.batches)
    finally:
        await batcher.close()


@pytest.mark.asyncio
async def test_tiles_of_one_request_may_share_a_batch_with_the_next():
    encoder = FakeEncoder()
    batcher = await started(encoder, max_batch_tiles=4, max_wait_s=0.2)
    try:
        a, b = await asyncio.gather(batcher.encode(tiles(1, 2, 3, 4, 5, 6)), batcher.encode(tiles(7)))
        assert torch.equal(a, expected(1, 2, 3, 4, 5, 6)) and torch.equal(b, expected(7))
        assert encoder.batches == [[1, 2, 3, 4], [5, 6, 7]]
    finally:
        await batcher.close()


@pytest.mark.asyncio
async def test_encoder_error_fails_that_batch_only():
    encoder = FakeEncoder(fail_on=99)
    batcher = await started(encoder, max_batch_tiles=8, max_wait_s=0.1)
    try:
        bad, good = await asyncio.gather(batcher.encode(tiles(99)), batcher.encode(tiles(1)),
                                         return_exceptions=True)
        # Both were in the failing batch.
        assert isinstance(bad, RuntimeError) and isinstance(good, RuntimeError)
        assert torch.equal(await batcher.encode(tiles(2)), expected(2))  # the worker lives on
        assert batcher.queued_tiles == 0
    finally:
        await batcher.close()


@pytest.mark.asyncio
async def test_wrong_row_count_from_encoder_is_an_error():
    batcher = await started(lambda batch, slots: batch[:1], max_wait_s=0)
    try:
        with pytest.raises(RuntimeError, match="rows for 2 tiles"):
            await batcher.encode(tiles(1, 2))
    finally:
        await batcher.close()


@pytest.mark.asyncio
async def test_loop_stays_responsive_while_the_encoder_runs():
    encoder = FakeEncoder(delay_s=0.3)
    batcher = await started(encoder, max_wait_s=0)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        await batcher.encode(tiles(1))
        assert ticks >= 10, ticks  # ~30 expected; a blocked loop would give 0 or 1
    finally:
        task.cancel()
        await batcher.close()


@pytest.mark.asyncio
async def test_cancelled_request_drops_its_queued_tiles():
    encoder = FakeEncoder(delay_s=0.2)
    batcher = await started(encoder, max_batch_tiles=2, max_wait_s=0)
    try:
        busy = asyncio.create_task(batcher.encode(tiles(1, 2)))  # occupies the encoder
        await asyncio.sleep(0.05)
        doomed = asyncio.create_task(batcher.encode(tiles(3, 4, 5)))
        await asyncio.sleep(0.01)
        assert batcher.queued_tiles == 3
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert batcher.queued_tiles == 0 and batcher.tiles_cancelled == 3
        assert torch.equal(await busy, expected(1, 2))
        assert torch.equal(await batcher.encode(tiles(6)), expected(6))
        assert [3.0] not in encoder.batches and all(3 not in b for b in encoder.batches)
        assert batcher.tiles_cancelled == 3  # counted once, and nothing that ran counts
    finally:
        await batcher.close()


@pytest.mark.asyncio
async def test_close_fails_queued_work_and_refuses_new_work():
    encoder = FakeEncoder(delay_s=0.2)
    batcher = await started(encoder, max_batch_tiles=1, max_wait_s=0)
    running = asyncio.create_task(batcher.encode(tiles(1)))
    await asyncio.sleep(0.05)
    queued = asyncio.create_task(batcher.encode(tiles(2)))
    await asyncio.sleep(0.01)
    await batcher.close()
    with pytest.raises(NotReadyError):
        await queued
    assert running.done()
    assert batcher.tiles_cancelled == 0  # failed by the shutdown, not cancelled by its caller
    with pytest.raises(NotReadyError):
        await batcher.encode(tiles(3))


@pytest.mark.asyncio
async def test_rejects_empty_input_and_bad_settings():
    with pytest.raises(ValueError):
        MicroBatcher(FakeEncoder(), max_batch_tiles=0, max_wait_s=0)
    with pytest.raises(ValueError):
        MicroBatcher(FakeEncoder(), max_batch_tiles=1, max_wait_s=-1)
    batcher = await started(FakeEncoder())
    try:
        with pytest.raises(ValueError):
            await batcher.encode(torch.zeros(0, 2))
    finally:
        await batcher.close()
