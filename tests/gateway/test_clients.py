"""gateway.clients without services: a Generate waiting for its first token gives up when its replica goes silent
and another is ready."""

from __future__ import annotations

import asyncio
import types

import pytest

from gateway.clients import _first_unless_silent
from services.contract.errors import NotReadyError


def endpoint() -> types.SimpleNamespace:
    return types.SimpleNamespace(silent=asyncio.Event())


@pytest.mark.asyncio
async def test_a_replica_going_silent_before_the_first_event_cancels_the_stream():
    cleaned = asyncio.Event()

    async def stream():
        try:
            await asyncio.sleep(3600)  # a paused replica: nothing ever comes
            yield "never"
        finally:
            cleaned.set()  # the gRPC call is cancelled here in the real stream

    replica = endpoint()
    asyncio.get_running_loop().call_later(0.05, replica.silent.set)
    with pytest.raises(NotReadyError, match="stopped answering before its first token"):
        await asyncio.wait_for(_first_unless_silent(stream(), replica, lambda: True), 5)
    assert cleaned.is_set()


@pytest.mark.asyncio
async def test_the_first_event_wins_and_the_stream_goes_on():
    async def stream():
        yield "first"
        yield "second"

    events = stream()
    replica = endpoint()
    assert await _first_unless_silent(events, replica, lambda: True) == "first"
    replica.silent.set()  # after the first token the stream is the caller's
    assert [e async for e in events] == ["second"]


@pytest.mark.asyncio
async def test_an_error_before_the_first_event_is_the_stream_own():
    async def stream():
        raise NotReadyError("the LLM replica is draining")
        yield  # pragma: no cover

    with pytest.raises(NotReadyError, match="draining"):
        await _first_unless_silent(stream(), endpoint(), lambda: True)


@pytest.mark.asyncio
async def test_an_empty_stream_gives_none():
    async def stream():
        return
        yield  # pragma: no cover

    assert await _first_unless_silent(stream(), endpoint(), lambda: True) is None


@pytest.mark.asyncio
async def test_with_no_other_replica_ready_it_keeps_waiting_until_one_is():
    started = asyncio.Event()
    answer = asyncio.Event()

    async def stream():
        started.set()
        await answer.wait()
        yield "late"

    replica = endpoint()
    replica.silent.set()
    others: list[str] = []
    waiting = asyncio.ensure_future(_first_unless_silent(stream(), replica, lambda: bool(others)))
    await started.wait()
    await asyncio.sleep(0.7)  # past a recheck: still waiting, nowhere else to go
    assert not waiting.done()
    answer.set()  # the slow replica answers after all
    assert await asyncio.wait_for(waiting, 5) == "late"

    answer.clear()
    waiting = asyncio.ensure_future(_first_unless_silent(stream(), replica, lambda: bool(others)))
    await asyncio.sleep(0.1)
    others.append("10.0.0.2:50053")  # another replica became ready
    with pytest.raises(NotReadyError):
        await asyncio.wait_for(waiting, 5)
