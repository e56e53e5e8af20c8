"""Priorities through the gateway's real gRPC servicer, against fake services (helpers.fakes): the priority reaches
the LLM, and with one slot (--max-in-flight 1) held by a blocked generation, sheddable requests are refused at once
with a `retry-after` trailer, critical ones go before standard ones, and a request whose deadline passes in the queue
is DEADLINE_EXCEEDED without reaching the services."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest
from helpers.chat import text_part
from helpers.fakes import fake_stack
from internvl.common.v1 import common_pb2
from internvl.gateway.v1 import gateway_pb2

from gateway import tenants
from gateway.chat_request import ChatRequest
from gateway.tenants import Tenant
from services.contract.priority import Priority
from services.runtime.grpc_errors import RETRY_AFTER_KEY

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]
G = gateway_pb2


def ask(text: str, priority: int = common_pb2.PRIORITY_UNSPECIFIED) -> G.ChatRequest:
    return G.ChatRequest(content=[text_part(text)], priority=priority)


async def answer(stack, request: G.ChatRequest, timeout: float = 20) -> str:
    return "".join([r.delta.text async for r in stack.stub.Chat(request, timeout=timeout) if r.HasField("delta")])


async def wait_for(condition, seconds: float = 10) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.01)


async def test_the_priority_reaches_the_llm_and_unset_is_the_flags_default():
    async with fake_stack(default_priority="sheddable") as stack:
        await answer(stack, ask("Hi", common_pb2.PRIORITY_CRITICAL))
        await answer(stack, ask("Hi"))
        assert [s.priority for s in stack.llm.starts] == [common_pb2.PRIORITY_CRITICAL, common_pb2.PRIORITY_SHEDDABLE]


async def test_a_request_without_a_priority_takes_its_tenants_default_before_the_flags():
    async with fake_stack(default_priority="sheddable") as stack:
        for tenant in (Tenant("console", priority=Priority.CRITICAL), Tenant("batch")):
            with tenants.scope(tenant):
                async with contextlib.aclosing(stack.orchestrator.chat(ChatRequest.from_pb(ask("Hi")))) as events:
                    [event async for event in events]
        assert [s.priority for s in stack.llm.starts] == [common_pb2.PRIORITY_CRITICAL, common_pb2.PRIORITY_SHEDDABLE]


async def test_an_unknown_priority_is_invalid_argument():
    async with fake_stack() as stack:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await answer(stack, ask("Hi", 9))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "priority 9" in info.value.details()


async def test_saturated_sheddable_is_refused_fast_and_critical_goes_before_queued_standard():
    async with fake_stack(max_in_flight=1, critical_reserve=0) as stack:
        stack.llm.block = True
        blocker = asyncio.ensure_future(answer(stack, ask("block", common_pb2.PRIORITY_STANDARD)))
        await asyncio.wait_for(stack.llm.blocked.wait(), 10)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await answer(stack, ask("shed me", common_pb2.PRIORITY_SHEDDABLE))
        assert time.monotonic() - started < 5  # refused at once, not after a wait (loose: a loaded machine)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "sheddable" in info.value.details()
        assert int(dict(info.value.trailing_metadata())[RETRY_AFTER_KEY]) >= 1
        standard = asyncio.ensure_future(answer(stack, ask("standard", common_pb2.PRIORITY_STANDARD)))
        await wait_for(lambda: stack.orchestrator.admission.queued() == 1)
        critical = asyncio.ensure_future(answer(stack, ask("critical", common_pb2.PRIORITY_CRITICAL)))
        await wait_for(lambda: stack.orchestrator.admission.queued() == 2)
        stack.llm.block = False
        blocker.cancel()  # frees the one slot
        assert await critical == await standard == "a b c"
        await asyncio.gather(blocker, return_exceptions=True)
        order = [s.user_parts[0].text for s in stack.llm.starts]
        assert order[0] == "block" and order[1:] == ["critical", "standard"], order
        shed = stack.metrics.admission.shed.labels("sheddable", "saturated")._value.get()
        assert shed == 1 and stack.metrics.admission.admitted.labels("critical")._value.get() == 1


async def test_a_request_whose_deadline_passes_in_the_queue_never_reaches_the_services():
    async with fake_stack(max_in_flight=1, critical_reserve=0) as stack:
        stack.llm.block = True
        blocker = asyncio.ensure_future(answer(stack, ask("block")))
        await asyncio.wait_for(stack.llm.blocked.wait(), 10)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await answer(stack, ask("late", common_pb2.PRIORITY_CRITICAL), timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The gateway dropped it from its queue at the deadline (not only the client that gave up).
        await wait_for(lambda: stack.metrics.admission.shed.labels("critical", "deadline")._value.get() == 1)
        blocker.cancel()
        await asyncio.gather(blocker, return_exceptions=True)
        assert [s.user_parts[0].text for s in stack.llm.starts] == ["block"]
        await wait_for(lambda: stack.orchestrator.admission.queued() == 0)
