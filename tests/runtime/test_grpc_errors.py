"""The one error table and the interceptor that applies it: every code has one gRPC and one HTTP status, the Python
codes are the proto's, domain errors become the documented statuses with a standard google.rpc.Status detail, and
anything else a generic INTERNAL."""

import asyncio

import grpc
import pytest
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from internvl.common.v1 import common_pb2

from gateway.errors import SessionMediaEvictedError
from services.contract.errors import (
    HTTP_BY_CODE,
    ContextTooLongError,
    DeadlineExceededError,
    EmbeddingsMissingError,
    ErrorCode,
    InternVLError,
    InvalidArgumentError,
    InvalidMediaError,
    MediaAccessError,
    NotFoundError,
    NotReadyError,
    OverloadedError,
    RequestTooLargeError,
    RpcStatus,
    SessionBusyError,
    SessionNotFoundError,
    ShedError,
    http_status,
    retry_after,
)
from services.runtime.grpc_errors import (
    RETRY_AFTER_KEY,
    STATUS_BY_CODE,
    error_detail,
    error_from_rpc,
    rich_status,
)
from services.runtime.grpc_server import GrpcServer, ServerOptions
from services.runtime.request_metrics import RequestMetrics

S = grpc.StatusCode

# The contract, written out once more: (gRPC status, HTTP status) of every code.
TABLE = {
    ErrorCode.INVALID_ARGUMENT: (S.INVALID_ARGUMENT, 400),
    ErrorCode.INVALID_MEDIA: (S.INVALID_ARGUMENT, 400),
    ErrorCode.MEDIA_TOO_LARGE: (S.INVALID_ARGUMENT, 400),
    ErrorCode.EMBEDDINGS_MISSING: (S.FAILED_PRECONDITION, 400),
    ErrorCode.MODEL_MISMATCH: (S.FAILED_PRECONDITION, 400),
    ErrorCode.CONTEXT_TOO_LONG: (S.INVALID_ARGUMENT, 400),
    ErrorCode.OVERLOADED: (S.RESOURCE_EXHAUSTED, 429),
    ErrorCode.NOT_READY: (S.UNAVAILABLE, 503),
    ErrorCode.INTERNAL: (S.INTERNAL, 500),
    ErrorCode.NOT_FOUND: (S.NOT_FOUND, 404),
    ErrorCode.SESSION_NOT_FOUND: (S.NOT_FOUND, 404),
    ErrorCode.SESSION_BUSY: (S.ABORTED, 409),
    ErrorCode.MEDIA_ACCESS_DENIED: (S.PERMISSION_DENIED, 403),
    ErrorCode.REQUEST_TOO_LARGE: (S.RESOURCE_EXHAUSTED, 413),
    ErrorCode.DEADLINE_EXCEEDED: (S.DEADLINE_EXCEEDED, 504),
}


@pytest.mark.parametrize("code", list(ErrorCode), ids=[c.name for c in ErrorCode])
def test_every_code_has_one_grpc_and_one_http_status(code):
    assert (STATUS_BY_CODE[code], HTTP_BY_CODE[code]) == TABLE[code]


def test_the_table_covers_every_code():
    assert set(TABLE) == set(ErrorCode) == set(STATUS_BY_CODE) == set(HTTP_BY_CODE)


def test_python_codes_are_the_proto_codes():
    proto = {name: number for name, number in common_pb2.ErrorCode.items() if name != "ERROR_CODE_UNSPECIFIED"}
    assert {f"ERROR_CODE_{code.name}": code.value for code in ErrorCode} == proto


def test_status_names_are_grpcs():
    assert {s.name: s.value for s in RpcStatus} == {c.name: c.value[0] for c in grpc.StatusCode}


def _error_classes(cls=InternVLError):
    for sub in cls.__subclasses__():
        yield sub
        yield from _error_classes(sub)


def test_every_error_class_has_exactly_one_code():
    classes = set(_error_classes())
    assert {SessionBusyError, SessionNotFoundError, MediaAccessError, RequestTooLargeError} <= classes
    for cls in classes:
        assert isinstance(cls.code, ErrorCode), cls


def test_cancellation_and_unexpected_errors():
    assert http_status(asyncio.CancelledError()) == 499
    assert http_status(RuntimeError("boom")) == 500
    assert http_status(RequestTooLargeError("big")) == 413 and http_status(OverloadedError("full")) == 429


CASES = [
    (InvalidArgumentError("max_num must be >= 1", item_index=2), S.INVALID_ARGUMENT),
    (InvalidMediaError("cannot decode image"), S.INVALID_ARGUMENT),
    (ContextTooLongError("prompt of 40000 tokens exceeds 32768"), S.INVALID_ARGUMENT),
    (EmbeddingsMissingError(["k1", "k2"]), S.FAILED_PRECONDITION),
    (OverloadedError("queue full"), S.RESOURCE_EXHAUSTED),
    (NotReadyError("loading"), S.UNAVAILABLE),
    (SessionNotFoundError("session 'abc' does not exist"), S.NOT_FOUND),
    (SessionBusyError("session 'abc' is answering another round"), S.ABORTED),
    (MediaAccessError("'/etc/passwd' is outside the gateway's media root"), S.PERMISSION_DENIED),
    (RequestTooLargeError("the request body is larger than the limit"), S.RESOURCE_EXHAUSTED),
    (DeadlineExceededError("the request's deadline passed"), S.DEADLINE_EXCEEDED),
    (SessionMediaEvictedError(["k3"]), S.FAILED_PRECONDITION),
    (RuntimeError("secret path /srv/weights at 10.0.0.3"), S.INTERNAL),
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

    server = GrpcServer(ServerOptions(port=0, host="127.0.0.1"), ["test.Service"], requests=RequestMetrics("test_"))
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
    code = getattr(exc, "code", ErrorCode.INTERNAL)
    assert STATUS_BY_CODE[code] == status
    for error in asyncio.run(_roundtrip(exc)):
        assert error.code() == status
        detail = error_detail(error)
        assert detail is not None
        assert detail.code == code  # the precise code, e.g. SESSION_BUSY rather than a generic one
        if status == S.INTERNAL:
            assert error.details() == "internal error"  # nothing of the real message leaks
            assert "secret" not in str(error.trailing_metadata())
        else:
            assert error.details() == str(exc)
        if isinstance(exc, EmbeddingsMissingError):
            assert list(detail.missing_keys) == exc.missing_keys
        if isinstance(exc, InvalidArgumentError):
            assert detail.item_index == 2


def test_the_detail_is_a_standard_google_rpc_status():
    """Any gRPC client reads it with grpcio-status: same code and message as the call, the detail packed in Any."""
    for error in asyncio.run(_roundtrip(SessionBusyError("busy"))):
        keys = [key for key, _ in error.trailing_metadata()]
        assert "grpc-status-details-bin" in keys and "internvl-error-detail-bin" not in keys
        status = rpc_status.from_call(error)  # raises if code or message disagree with the call's
        assert isinstance(status, status_pb2.Status) and status.code == S.ABORTED.value[0]
        detail = common_pb2.ErrorDetail()
        assert len(status.details) == 1 and status.details[0].Unpack(detail)
        assert detail.code == common_pb2.ERROR_CODE_SESSION_BUSY


async def _send_bytes(requests: list[bytes]) -> list[grpc.aio.AioRpcError]:
    """Sends each of `requests` as the raw bytes of a `HealthCheckRequest` to a unary and a client-streaming method
    that parse it; returns the errors, unary first."""
    seen = []

    async def unary(request, context):
        seen.append(request)
        return health_pb2.HealthCheckResponse()

    async def client_stream(requests, context):
        async for request in requests:
            seen.append(request)
        return health_pb2.HealthCheckResponse()

    parse, write = health_pb2.HealthCheckRequest.FromString, health_pb2.HealthCheckResponse.SerializeToString
    server = GrpcServer(ServerOptions(port=0, host="127.0.0.1"), ["test.Service"], requests=RequestMetrics("test_"))
    server.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Service", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, parse, write),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream, parse, write),
    })])
    port = await server.start()
    errors = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            good = health_pb2.HealthCheckRequest(service="ok").SerializeToString()
            for call in (channel.unary_unary("/test.Service/Unary")(requests[0]),
                         channel.stream_unary("/test.Service/ClientStream")(iter([good, *requests]))):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                errors.append(info.value)
    finally:
        await server.stop()
    assert [r.service for r in seen] == ["ok"]  # the stream's good message reached the handler, no bad one did
    return errors


@pytest.mark.parametrize("data", [b"\x0a\x02\xed\xa0", b"\xff\xff\xff"], ids=["string-not-utf8", "corrupt"])
def test_a_request_that_is_not_a_message_is_invalid_argument(data):
    """gRPC's own answer would be UNKNOWN naming a Python class ("Unexpected <class '...DecodeError'>")."""
    for error in asyncio.run(_send_bytes([data])):
        assert error.code() == S.INVALID_ARGUMENT
        assert error.details().startswith("the request is not a valid message: Error parsing message with type "
                                          "'grpc.health.v1.HealthCheckRequest'"), error.details()
        assert "<class" not in error.details()
        assert error_detail(error).code == ErrorCode.INVALID_ARGUMENT


@pytest.mark.parametrize("quoted", ["x" * 20_000, "é" * 20_000, "😀" * 5_000])
def test_a_message_quoting_a_long_input_is_cut_and_keeps_its_detail(quoted):
    """Uncut, the trailers passed the client's 8 KiB limit: RESOURCE_EXHAUSTED ("Stream removed"), no detail."""
    for error in asyncio.run(_roundtrip(NotFoundError(f"model {quoted!r} is not served"))):
        assert error.code() == S.NOT_FOUND
        assert error_detail(error).code == ErrorCode.NOT_FOUND
        message = error.details()
        assert message.startswith("model '" + quoted[:100]) and message.endswith(" ... (cut)")
        assert len(message.encode()) <= 1024
    short = "model 'x' is not served"
    assert [e.details() for e in asyncio.run(_roundtrip(NotFoundError(short)))] == [short, short]


def test_a_refusal_under_load_carries_retry_after_in_the_trailers():
    for error in asyncio.run(_roundtrip(ShedError("the gateway is saturated", retry_after_s=2.2))):
        assert error.code() == S.UNAVAILABLE
        assert dict(error.trailing_metadata())[RETRY_AFTER_KEY] == "3"  # whole seconds, rounded up
        assert error_detail(error).code == ErrorCode.NOT_READY
    for error in asyncio.run(_roundtrip(NotReadyError("loading"))):
        assert RETRY_AFTER_KEY not in dict(error.trailing_metadata())


def test_retry_after_is_whole_seconds_and_at_least_one():
    assert [retry_after(ShedError("x", retry_after_s=s)) for s in (0.01, 1.0, 59.5)] == ["1", "1", "60"]
    assert retry_after(ShedError("x")) is None and retry_after(RuntimeError("x")) is None
    assert http_status(ShedError("x", retry_after_s=1)) == 503


def _aio_error(status: grpc.StatusCode, message: str, detail: common_pb2.ErrorDetail | None) -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata(*rich_status(status, message, detail).trailing_metadata) if detail is not None \
        else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(status, grpc.aio.Metadata(), trailing, message)


def test_a_peer_not_ready_says_why_and_a_bare_unavailable_names_no_address():
    ours = _aio_error(grpc.StatusCode.UNAVAILABLE, "the embedding cache is unreachable (Redis did not answer in time); "
                      "retry later", common_pb2.ErrorDetail(code=int(ErrorCode.NOT_READY)))
    error = error_from_rpc(ours, "the vision service")
    assert isinstance(error, NotReadyError)
    assert str(error) == ("the vision service is unavailable, retry later: the embedding cache is unreachable (Redis "
                          "did not answer in time); retry later")
    bare = _aio_error(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: ipv4:10.1.2.3:50052",
                      None)
    assert str(error_from_rpc(bare, "the vision service")) == "the vision service is unavailable, retry later"
