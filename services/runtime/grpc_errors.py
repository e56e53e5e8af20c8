"""The one place domain errors become gRPC statuses.

`ErrorMappingInterceptor` wraps every handler of every server: an `InternVLError` aborts the call with the status of
its code (the table in `services.contract.errors`), its caller-safe message, and an `ErrorDetail`; anything
else is logged with its traceback and answered `INTERNAL` with a generic message, so nothing internal leaks. A request
whose bytes are not a message of its type is `INVALID_ARGUMENT` like any other bad input.

The detail travels the standard way (grpcio-status): a `google.rpc.Status` with the call's code and message, its
`details` one `Any` packing the `ErrorDetail`, serialized under the trailing metadata key `grpc-status-details-bin`.
Any gRPC client can read it without knowing this project's conventions; `error_detail` is the Python helper.
"""

from __future__ import annotations

import inspect
import logging

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from grpc_status import rpc_status
from internvl.common.v1 import common_pb2

from services.contract.errors import (
    ERROR_BY_CODE,
    EmbeddingsMissingError,
    ErrorCode,
    InternVLError,
    InvalidArgumentError,
    RpcStatus,
    error_code,
    retry_after,
)
from services.contract.errors import STATUS_BY_CODE as RPC_STATUS_BY_CODE

log = logging.getLogger(__name__)


def grpc_code(status: RpcStatus) -> grpc.StatusCode:
    """The grpc.StatusCode of a status named in the contract."""
    return grpc.StatusCode[status.name]


STATUS_BY_CODE: dict[ErrorCode, grpc.StatusCode] = {code: grpc_code(status)
                                                    for code, status in RPC_STATUS_BY_CODE.items()}


# The longest message a status carries, in UTF-8 bytes. It travels twice in the trailers (percent-encoded in
# grpc-message, up to 3 bytes per byte, and inside grpc-status-details-bin, base64), and a client drops trailers over
# 8 KiB (gRPC's default limit) for RESOURCE_EXHAUSTED without the detail; a message quoting a long input (an unknown
# adapter's name) would pass it.
MAX_MESSAGE_BYTES = 1024
# Trailing metadata of a refusal under load: whole seconds after which a retry has a fair chance (HTTP's Retry-After).
RETRY_AFTER_KEY = "retry-after"
CUT = " ... (cut)"


def bounded(message: str) -> str:
    """`message`, cut to `MAX_MESSAGE_BYTES` (a cut one ends with `CUT`)."""
    data = message.encode()
    if len(data) <= MAX_MESSAGE_BYTES:
        return message
    return data[:MAX_MESSAGE_BYTES - len(CUT)].decode(errors="ignore") + CUT


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, common_pb2.ErrorDetail]:
    """(status, caller-safe message, detail) for any exception a handler raised."""
    code = error_code(exc)
    detail = common_pb2.ErrorDetail(code=int(code))
    if not isinstance(exc, InternVLError):
        return STATUS_BY_CODE[code], "internal error", detail
    if exc.item_index is not None:
        detail.item_index = exc.item_index
    if isinstance(exc, EmbeddingsMissingError):
        detail.missing_keys.extend(exc.missing_keys)
    return STATUS_BY_CODE[code], bounded(str(exc)), detail


def rich_status(status: grpc.StatusCode, message: str, detail: common_pb2.ErrorDetail) -> grpc.Status:
    """The status to abort with: code, message, and the detail packed into `grpc-status-details-bin`."""
    packed = any_pb2.Any()
    packed.Pack(detail)
    return rpc_status.to_status(status_pb2.Status(code=status.value[0], message=message, details=[packed]))


def error_detail(error) -> common_pb2.ErrorDetail | None:
    """Client side: the ErrorDetail a failed call carries, if any (an RpcError, sync or aio, or an ended aio call).

    Read straight from the trailer rather than through `rpc_status.from_call`, which raises when the status proto and
    the call's status disagree (a proxy may rewrite a message): the detail is still the server's.
    """
    for key, value in error.trailing_metadata() or ():
        if key == rpc_status.GRPC_DETAILS_METADATA_KEY:
            for packed in status_pb2.Status.FromString(value).details:
                detail = common_pb2.ErrorDetail()
                if packed.Unpack(detail):
                    return detail
    return None


# What a caller is told of a peer's failure with these codes: the peer's own message says what it found, not that
# the caller can retry or where it failed ({message} is the peer's message, {peer} "the vision service", say).
_PEER_MESSAGES: dict[ErrorCode, str] = {
    ErrorCode.MODEL_MISMATCH: "{peer} refused the call: {message}",
    ErrorCode.OVERLOADED: "{peer} is overloaded, retry later: {message}",
    ErrorCode.NOT_READY: "{peer} is unavailable, retry later",
    ErrorCode.DEADLINE_EXCEEDED: "the deadline passed while waiting for {peer}",
    ErrorCode.INTERNAL: "internal error",
}
# The code of a status that arrives without an ErrorDetail: one gRPC itself made (a dead connection, a deadline,
# a message over the size limit) or a peer that is not ours.
_CODE_OF_BARE_STATUS: dict[grpc.StatusCode, ErrorCode] = {
    grpc.StatusCode.INVALID_ARGUMENT: ErrorCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION: ErrorCode.MODEL_MISMATCH,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ErrorCode.OVERLOADED,
    grpc.StatusCode.UNAVAILABLE: ErrorCode.NOT_READY,
    grpc.StatusCode.DEADLINE_EXCEEDED: ErrorCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.NOT_FOUND: ErrorCode.NOT_FOUND,
}


def error_from_rpc(error: grpc.aio.AioRpcError, peer: str) -> InternVLError:
    """Client side: the domain error a failed call to `peer` ("the LLM service") stands for, decoded through the one
    table: the ErrorDetail's code gives the same error class again (so every code a peer raises reaches this side's
    caller with its own status), a bare status its usual code. INTERNAL is logged here, since its message is not
    passed on."""
    status, message = error.code(), error.details() or ""
    detail = error_detail(error)
    if status == grpc.StatusCode.CANCELLED and detail is None:
        return ERROR_BY_CODE[ErrorCode.NOT_READY](f"{peer} cancelled the call (it may be draining), retry")
    try:
        code = ErrorCode(detail.code) if detail is not None else _CODE_OF_BARE_STATUS[status]
    except (ValueError, KeyError):
        code = ErrorCode.INTERNAL
    if code == ErrorCode.INTERNAL:
        log.error("%s failed: %s %s", peer, status.name, message)
    if code == ErrorCode.EMBEDDINGS_MISSING:
        return EmbeddingsMissingError(list(detail.missing_keys) if detail is not None else [])
    index = detail.item_index if detail is not None and detail.HasField("item_index") else None
    text = _PEER_MESSAGES.get(code, "{message}").format(peer=peer, message=message)
    if code == ErrorCode.NOT_READY and detail is not None:
        # Our own peer says why (its Redis does not answer, its model is loading): the caller needs to know, and its
        # messages are caller-safe. gRPC's own (no detail: a refused connection) name addresses, so are not passed on.
        text = f"{text}: {message}"
    return ERROR_BY_CODE[code](text, item_index=index)


# The trailing metadata key of an error's retry advice (whole seconds, as HTTP's Retry-After).
RETRY_AFTER_KEY = "retry-after"


async def abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    """Ends the call with the status of `exc` (logged; a traceback for INTERNAL), its detail, and its retry advice
    under `retry-after` when it has one."""
    status, message, detail = status_for(exc)
    if status == grpc.StatusCode.INTERNAL:
        log.exception("unexpected error in %s", method, exc_info=exc)
    else:
        log.info("%s failed: %s %s", method, status.name, message)
    rich = rich_status(status, message, detail)
    advice = retry_after(exc)
    extra = ((RETRY_AFTER_KEY, advice),) if advice is not None else ()
    await context.abort(rich.code, rich.details, trailing_metadata=(*rich.trailing_metadata, *extra))


def _parsed(deserializer, data: bytes):
    """A request message from its bytes; bytes that are not one (corrupt wire format, a string field that is not
    UTF-8) are the caller's error. gRPC itself would answer them UNKNOWN, with a message naming a Python class."""
    if deserializer is None:
        return data
    try:
        return deserializer(data)
    except DecodeError as exc:
        raise InvalidArgumentError(f"the request is not a valid message: {exc}") from None


async def _parsed_stream(deserializer, messages):
    async for data in messages:
        yield _parsed(deserializer, data)


def _wrap_unary_response(behavior, method: str, deserializer, streaming_request: bool):
    async def wrapper(request, context):
        try:
            request = _parsed_stream(deserializer, request) if streaming_request else _parsed(deserializer, request)
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - the point of this layer
            await abort(context, exc, method)

    return wrapper


def _wrap_stream_response(behavior, method: str, deserializer, streaming_request: bool):
    async def wrapper(request, context):
        try:
            request = _parsed_stream(deserializer, request) if streaming_request else _parsed(deserializer, request)
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            await abort(context, exc, method)

    return wrapper


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Maps every exception of a handler to its status, parsing of the request included: the handler it returns
    takes the request's bytes (no deserializer) and parses them inside the mapping."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method, parse = handler_call_details.method, handler.request_deserializer
        if handler.unary_unary or handler.stream_unary:
            factory = (grpc.unary_unary_rpc_method_handler if handler.unary_unary
                       else grpc.stream_unary_rpc_method_handler)
            wrapped = _wrap_unary_response(handler.unary_unary or handler.stream_unary, method, parse,
                                           handler.request_streaming)
            return factory(wrapped, None, handler.response_serializer)
        behavior = handler.unary_stream or handler.stream_stream
        if not inspect.isasyncgenfunction(behavior):
            return handler  # health and reflection: library handlers that report their own errors
        factory = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
        return factory(_wrap_stream_response(behavior, method, parse, handler.request_streaming), None,
                       handler.response_serializer)
