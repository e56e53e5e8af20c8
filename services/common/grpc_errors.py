"""The one place domain errors become gRPC statuses.

`ErrorMappingInterceptor` wraps every handler of a server: an `InternVLError` aborts the call with the mapped status,
its caller-safe message, and an `ErrorDetail` in the trailing metadata (`internvl-error-detail-bin`); anything else
is logged with its traceback and answered `INTERNAL` with a generic message, so nothing internal leaks.
"""

from __future__ import annotations

import inspect
import logging

import grpc
from internvl.common.v1 import common_pb2

from services.common.errors import EmbeddingsMissingError, ErrorCode, InternVLError

log = logging.getLogger(__name__)

DETAIL_METADATA_KEY = "internvl-error-detail-bin"

STATUS_BY_CODE: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.INVALID_MEDIA: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.MEDIA_TOO_LARGE: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.CONTEXT_TOO_LONG: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.EMBEDDINGS_MISSING: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.MODEL_MISMATCH: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.NOT_READY: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, common_pb2.ErrorDetail]:
    """(status, caller-safe message, detail) for any exception a handler raised."""
    if isinstance(exc, InternVLError):
        detail = common_pb2.ErrorDetail(code=int(exc.code))
        if exc.item_index is not None:
            detail.item_index = exc.item_index
        if isinstance(exc, EmbeddingsMissingError):
            detail.missing_keys.extend(exc.missing_keys)
        return STATUS_BY_CODE[exc.code], str(exc), detail
    return grpc.StatusCode.INTERNAL, "internal error", common_pb2.ErrorDetail(code=int(ErrorCode.INTERNAL))


def error_detail(call_or_error) -> common_pb2.ErrorDetail | None:
    """Client side: the ErrorDetail a failed call carries, if any (works on aio calls and RpcErrors)."""
    metadata = call_or_error.trailing_metadata() or ()
    for key, value in metadata:
        if key == DETAIL_METADATA_KEY:
            return common_pb2.ErrorDetail.FromString(value)
    return None


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    status, message, detail = status_for(exc)
    if status == grpc.StatusCode.INTERNAL:
        log.exception("unexpected error in %s", method, exc_info=exc)
    else:
        log.info("%s failed: %s %s", method, status.name, message)
    await context.abort(status, message, trailing_metadata=((DETAIL_METADATA_KEY, detail.SerializeToString()),))


def _wrap_unary_response(behavior, method: str):
    async def wrapper(request, context):
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - the point of this layer
            await _abort(context, exc, method)

    return wrapper


def _wrap_stream_response(behavior, method: str):
    async def wrapper(request, context):
        try:
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc, method)

    return wrapper


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary_response(handler.unary_unary, method),
                handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary_response(handler.stream_unary, method),
                handler.request_deserializer, handler.response_serializer)
        behavior = handler.unary_stream or handler.stream_stream
        if not inspect.isasyncgenfunction(behavior):
            return handler  # health and reflection: library handlers that report their own errors
        factory = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
        return factory(_wrap_stream_response(behavior, method), handler.request_deserializer,
                       handler.response_serializer)
