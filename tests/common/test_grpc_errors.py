"""The error interceptor: domain errors become the documented statuses, anything else a generic INTERNAL."""

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.errors import (
    ContextTooLongError,
    EmbeddingsMissingError,
    ErrorCode,
    InvalidArgumentError,
    InvalidMediaError,
    NotReadyError,
    OverloadedError,
)
from services.common.grpc_errors import error_detail
from services.common.grpc_server import GrpcServer, ServerOptions

CASES = [
    (InvalidArgumentError("max_num must be >= 1", item_index=2), grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidMediaError("cannot decode image"), grpc.StatusCode.INVALID_ARGUMENT),
    (ContextTooLongError("prompt of 40000 tokens exceeds 32768"), grpc.StatusCode.INVALID_ARGUMENT),
    (EmbeddingsMissingError(["k1", "k2"]), grpc.StatusCode.FAILED_PRECONDITION),
    (OverloadedError("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotReadyError("loading"), grpc.StatusCode.UNAVAILABLE),
    (RuntimeError("secret path /srv/weights at 10.0.0.3"), grpc.StatusCode.INTERNAL),
]


def _identity(x):
    return x


async def _roundtrip(exc):
    """Starts a server whose unary and streaming methods raise `exc`; returns both calls' errors."""

    async def unary(request, context):
        raise exc

    async def stream(request, context):
        yield b"first"
        raise exc

    server = GrpcServer(ServerOptions(port=0, host="127.0.0.1"), ["test.Service"])
    server.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Service", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, _identity, _identity),
        "Stream": grpc.unary_stream_rpc_method_handler(stream, _identity, _identity),
    })])
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            before = await health.Check(health_pb2.HealthCheckRequest(service="test.Service"))
            await server.mark_ready()
            after = await health.Check(health_pb2.HealthCheckRequest(service="test.Service"))
            assert (before.status, after.status) == (health_pb2.HealthCheckResponse.NOT_SERVING,
                                                     health_pb2.HealthCheckResponse.SERVING)
            errors = []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary("/test.Service/Unary")(b"x")
            errors.append(info.value)
            call = channel.unary_stream("/test.Service/Stream")(b"x")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                assert await call.read() == b"first"
                await call.read()
            errors.append(info.value)
            return errors
    finally:
        await server.stop()


@pytest.mark.parametrize(("exc", "status"), CASES, ids=[type(e).__name__ for e, _ in CASES])
def test_errors_map_to_status_and_detail(exc, status):
    for error in asyncio.run(_roundtrip(exc)):
        assert error.code() == status
        detail = error_detail(error)
        assert detail is not None
        assert detail.code == getattr(exc, "code", ErrorCode.INTERNAL)
        if status == grpc.StatusCode.INTERNAL:
            assert error.details() == "internal error"  # nothing of the real message leaks
            assert "secret" not in str(error.trailing_metadata())
        else:
            assert error.details() == str(exc)
        if isinstance(exc, EmbeddingsMissingError):
            assert list(detail.missing_keys) == ["k1", "k2"]
        if isinstance(exc, InvalidArgumentError):
            assert detail.item_index == 2
