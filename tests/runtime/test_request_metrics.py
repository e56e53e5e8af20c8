"""The one request-metrics interceptor: every call to a server's own services is counted by method and the status
that went on the wire, timed, and in flight while it runs; health checks are not counted."""

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.contract.errors import InvalidMediaError, SessionBusyError
from services.runtime.grpc_server import GrpcServer, ServerOptions
from services.runtime.request_metrics import RequestMetrics

PREFIX = "test_"


def _identity(x):
    return x


class Recorded:
    def __init__(self, metrics: RequestMetrics):
        self.registry = metrics.registry

    def count(self, method: str, code: str) -> float:
        return self.registry.get_sample_value(PREFIX + "requests_total", {"method": method, "code": code}) or 0

    def timed(self, method: str) -> float:
        return self.registry.get_sample_value(PREFIX + "request_seconds_count", {"method": method}) or 0

    def in_flight(self, method: str) -> float:
        return self.registry.get_sample_value(PREFIX + "in_flight_requests", {"method": method}) or 0

    def methods(self) -> set[str]:
        return {s.labels["method"] for m in self.registry.collect() for s in m.samples if "method" in s.labels}


async def _exercise() -> Recorded:
    started = asyncio.Event()

    async def unary(request, context):
        if request == b"busy":
            raise SessionBusyError("busy")
        return request

    async def stream(request, context):
        yield b"first"
        if request == b"bad":
            raise InvalidMediaError("cannot decode image")
        if request == b"hang":
            started.set()
            await asyncio.sleep(60)
        yield b"second"

    metrics = RequestMetrics(PREFIX)
    server = GrpcServer(ServerOptions(port=0, host="127.0.0.1"), ["test.Service"], requests=metrics)
    server.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Service", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, _identity, _identity),
        "Stream": grpc.unary_stream_rpc_method_handler(stream, _identity, _identity),
    })])
    port = await server.start()
    recorded = Recorded(metrics)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            unary_call = channel.unary_unary("/test.Service/Unary")
            assert await unary_call(b"x") == b"x"
            with pytest.raises(grpc.aio.AioRpcError):
                await unary_call(b"busy")
            stream_call = channel.unary_stream("/test.Service/Stream")
            assert [m async for m in stream_call(b"ok")] == [b"first", b"second"]
            with pytest.raises(grpc.aio.AioRpcError):
                _ = [m async for m in stream_call(b"bad")]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                _ = [m async for m in stream_call(b"hang", timeout=0.5)]
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            started.clear()
            call = stream_call(b"hang")
            assert await call.read() == b"first"
            await asyncio.wait_for(started.wait(), 5)
            assert recorded.in_flight("Stream") == 1
            call.cancel()
            for _ in range(100):  # the server records the cancellation once its handler unwinds
                if recorded.count("Stream", "CANCELLED"):
                    break
                await asyncio.sleep(0.02)
            for _ in range(100):
                if recorded.count("Stream", "DEADLINE_EXCEEDED"):
                    break
                await asyncio.sleep(0.02)
    finally:
        await server.stop()
    return recorded


def test_calls_are_counted_by_method_and_final_status():
    recorded = asyncio.run(_exercise())
    assert recorded.count("Unary", "OK") == 1
    assert recorded.count("Unary", "ABORTED") == 1  # the status of the error's code, as the caller saw it
    assert recorded.count("Stream", "OK") == 1
    assert recorded.count("Stream", "INVALID_ARGUMENT") == 1
    assert recorded.count("Stream", "DEADLINE_EXCEEDED") == 1
    assert recorded.count("Stream", "CANCELLED") == 1
    assert recorded.timed("Unary") == 2 and recorded.timed("Stream") == 4
    assert recorded.in_flight("Unary") == recorded.in_flight("Stream") == 0
    assert recorded.methods() == {"Unary", "Stream"}  # grpc.health.v1 Check is not a request of the service


def test_track_records_other_transports_in_the_same_families():
    metrics = RequestMetrics(PREFIX)
    recorded = Recorded(metrics)
    with metrics.track("openai.chat_completions"):
        pass
    with pytest.raises(SessionBusyError), metrics.track("openai.chat_completions"):
        raise SessionBusyError("busy")
    with metrics.track("openai.chat_completions") as call:
        call.code = "NOT_FOUND"  # answered with an error body, not an exception
    assert [recorded.count("openai.chat_completions", code) for code in ("OK", "ABORTED", "NOT_FOUND")] == [1, 1, 1]
    assert recorded.timed("openai.chat_completions") == 3
