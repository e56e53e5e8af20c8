"""Domain errors shared by the services, and the one table of the statuses they end a call with.

Transport-free (no grpc, no aiohttp): each `ErrorCode` has exactly one gRPC status, named by `RpcStatus`, and one HTTP
status derived from it. `services.runtime.grpc_errors` turns the names into `grpc.StatusCode`s in the one interceptor
every server runs; the gateway's HTTP API reads `http_status`. Every message here is written for the caller and is
safe to return to them.
"""

from __future__ import annotations

import asyncio
import enum
import math


class ErrorCode(enum.IntEnum):
    """Mirrors `internvl.common.v1.ErrorCode` (same numbers), without importing the generated stubs."""

    INVALID_ARGUMENT = 1
    INVALID_MEDIA = 2
    MEDIA_TOO_LARGE = 3
    EMBEDDINGS_MISSING = 4
    MODEL_MISMATCH = 5
    CONTEXT_TOO_LONG = 6
    OVERLOADED = 7
    NOT_READY = 8
    INTERNAL = 9
    NOT_FOUND = 10
    SESSION_NOT_FOUND = 11
    SESSION_BUSY = 12
    MEDIA_ACCESS_DENIED = 13
    REQUEST_TOO_LARGE = 14
    DEADLINE_EXCEEDED = 15


class RpcStatus(enum.IntEnum):
    """The gRPC status codes, by their canonical names and numbers, so this module needs no grpc import."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# The one gRPC status of each code.
STATUS_BY_CODE: dict[ErrorCode, RpcStatus] = {
    ErrorCode.INVALID_ARGUMENT: RpcStatus.INVALID_ARGUMENT,
    ErrorCode.INVALID_MEDIA: RpcStatus.INVALID_ARGUMENT,
    ErrorCode.MEDIA_TOO_LARGE: RpcStatus.INVALID_ARGUMENT,
    ErrorCode.CONTEXT_TOO_LONG: RpcStatus.INVALID_ARGUMENT,
    ErrorCode.EMBEDDINGS_MISSING: RpcStatus.FAILED_PRECONDITION,
    ErrorCode.MODEL_MISMATCH: RpcStatus.FAILED_PRECONDITION,
    ErrorCode.OVERLOADED: RpcStatus.RESOURCE_EXHAUSTED,
    ErrorCode.NOT_READY: RpcStatus.UNAVAILABLE,
    ErrorCode.INTERNAL: RpcStatus.INTERNAL,
    ErrorCode.NOT_FOUND: RpcStatus.NOT_FOUND,
    ErrorCode.SESSION_NOT_FOUND: RpcStatus.NOT_FOUND,
    ErrorCode.SESSION_BUSY: RpcStatus.ABORTED,
    ErrorCode.MEDIA_ACCESS_DENIED: RpcStatus.PERMISSION_DENIED,
    # What gRPC itself answers for a message over the size limit, so both refusals read the same.
    ErrorCode.REQUEST_TOO_LARGE: RpcStatus.RESOURCE_EXHAUSTED,
    ErrorCode.DEADLINE_EXCEEDED: RpcStatus.DEADLINE_EXCEEDED,
}

# HTTP status of each gRPC status (the usual mapping; 499 is nginx's "client closed request"). Statuses no code maps
# to are here too, because the HTTP API and the request metrics also meet cancellations and refused tokens.
HTTP_BY_STATUS: dict[RpcStatus, int] = {
    RpcStatus.OK: 200,
    RpcStatus.INVALID_ARGUMENT: 400,
    RpcStatus.FAILED_PRECONDITION: 400,
    RpcStatus.OUT_OF_RANGE: 400,
    RpcStatus.UNAUTHENTICATED: 401,
    RpcStatus.PERMISSION_DENIED: 403,
    RpcStatus.NOT_FOUND: 404,
    RpcStatus.ABORTED: 409,
    RpcStatus.ALREADY_EXISTS: 409,
    RpcStatus.RESOURCE_EXHAUSTED: 429,
    RpcStatus.CANCELLED: 499,
    RpcStatus.UNKNOWN: 500,
    RpcStatus.INTERNAL: 500,
    RpcStatus.DATA_LOSS: 500,
    RpcStatus.UNIMPLEMENTED: 501,
    RpcStatus.UNAVAILABLE: 503,
    RpcStatus.DEADLINE_EXCEEDED: 504,
}

# The one code whose HTTP status is not its gRPC status's: HTTP has a precise status for a body over the limit
# (413 Content Too Large), where RESOURCE_EXHAUSTED otherwise means "retry later" (429).
_HTTP_OVERRIDES: dict[ErrorCode, int] = {ErrorCode.REQUEST_TOO_LARGE: 413}

# The one HTTP status of each code.
HTTP_BY_CODE: dict[ErrorCode, int] = {code: _HTTP_OVERRIDES.get(code, HTTP_BY_STATUS[status])
                                      for code, status in STATUS_BY_CODE.items()}


class InternVLError(Exception):
    """Base of every error the project raises on purpose; its message is safe to show a caller."""

    code = ErrorCode.INTERNAL

    def __init__(self, message: str, *, item_index: int | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.item_index = item_index
        # Seconds after which the caller may retry with a fair chance (a refusal under load, a tenant's rate limit
        # refilling); None: no advice.
        # Sent as the gRPC trailing metadata `retry-after` and the HTTP header `Retry-After` (`retry_after`).
        self.retry_after_s = retry_after_s


class InvalidArgumentError(InternVLError, ValueError):
    """A malformed request: empty input, an option out of range, a placeholder count mismatch."""

    code = ErrorCode.INVALID_ARGUMENT


class InvalidMediaError(InternVLError, ValueError):
    """Media bytes that cannot be decoded, are empty, or exceed a configured limit."""

    code = ErrorCode.INVALID_MEDIA


class MediaTooLargeError(InvalidMediaError):
    """An image over the configured pixel limit (a decompression bomb guard)."""

    code = ErrorCode.MEDIA_TOO_LARGE


class EmbeddingsMissingError(InternVLError):
    """Embeddings referenced by key are not (or no longer) in the cache: re-encode them and retry."""

    code = ErrorCode.EMBEDDINGS_MISSING

    def __init__(self, missing_keys: list[str]):
        super().__init__(f"embeddings not in the cache (evicted or never encoded): {', '.join(missing_keys)}")
        self.missing_keys = list(missing_keys)


class NotFoundError(InternVLError):
    """What the caller named does not exist, e.g. FetchEmbeddings of a key that is not in the cache."""

    code = ErrorCode.NOT_FOUND


class ModelMismatchError(InternVLError):
    code = ErrorCode.MODEL_MISMATCH


class ContextTooLongError(InternVLError):
    code = ErrorCode.CONTEXT_TOO_LONG


class OverloadedError(InternVLError):
    code = ErrorCode.OVERLOADED


class NotReadyError(InternVLError):
    code = ErrorCode.NOT_READY


class ShedError(NotReadyError):
    """Refused, without any work, because the gateway is saturated (its priority lost): UNAVAILABLE / HTTP 503, with
    `retry_after_s` set. The code stays NOT_READY (transient: retry later or elsewhere)."""


class InternalError(InternVLError):
    """Something failed that the caller cannot mend (a peer's INTERNAL, say); the message stays generic."""

    code = ErrorCode.INTERNAL


class SessionNotFoundError(NotFoundError):
    """The session id is unknown, or the session expired (sessions live --session-ttl-s after their last turn)."""

    code = ErrorCode.SESSION_NOT_FOUND


class SessionBusyError(InternVLError):
    """Another turn of the same session is still running; a session answers one turn at a time."""

    code = ErrorCode.SESSION_BUSY


class MediaAccessError(InternVLError):
    """A file path outside the media root, or file paths while the gateway has no media root."""

    code = ErrorCode.MEDIA_ACCESS_DENIED


class RequestTooLargeError(InternVLError):
    """A request body over the size limit (gRPC refuses such messages itself, with the same status)."""

    code = ErrorCode.REQUEST_TOO_LARGE


class DeadlineExceededError(InternVLError):
    """The caller's deadline passed while a server waited on another."""

    code = ErrorCode.DEADLINE_EXCEEDED


class CheckpointError(InternVLError):
    """A checkpoint directory that cannot be loaded: the message names the file and the problem."""


# The error each code is raised as, so a code read back from a peer's ErrorDetail becomes the same error again.
ERROR_BY_CODE: dict[ErrorCode, type[InternVLError]] = {
    ErrorCode.INVALID_ARGUMENT: InvalidArgumentError,
    ErrorCode.INVALID_MEDIA: InvalidMediaError,
    ErrorCode.MEDIA_TOO_LARGE: MediaTooLargeError,
    ErrorCode.EMBEDDINGS_MISSING: EmbeddingsMissingError,
    ErrorCode.MODEL_MISMATCH: ModelMismatchError,
    ErrorCode.CONTEXT_TOO_LONG: ContextTooLongError,
    ErrorCode.OVERLOADED: OverloadedError,
    ErrorCode.NOT_READY: NotReadyError,
    ErrorCode.INTERNAL: InternalError,
    ErrorCode.NOT_FOUND: NotFoundError,
    ErrorCode.SESSION_NOT_FOUND: SessionNotFoundError,
    ErrorCode.SESSION_BUSY: SessionBusyError,
    ErrorCode.MEDIA_ACCESS_DENIED: MediaAccessError,
    ErrorCode.REQUEST_TOO_LARGE: RequestTooLargeError,
    ErrorCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def error_code(exc: BaseException) -> ErrorCode:
    """The code a call failing with `exc` reports: its own for a domain error, INTERNAL for anything else."""
    return exc.code if isinstance(exc, InternVLError) else ErrorCode.INTERNAL


def rpc_status(exc: BaseException) -> RpcStatus:
    """The gRPC status a call failing with `exc` ends with (a cancellation is CANCELLED, not an error)."""
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return RpcStatus.CANCELLED
    return STATUS_BY_CODE[error_code(exc)]


def http_status(exc: BaseException) -> int:
    """The HTTP status a request failing with `exc` ends with."""
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return HTTP_BY_STATUS[RpcStatus.CANCELLED]
    return HTTP_BY_CODE[error_code(exc)]


def retry_after(exc: BaseException) -> str | None:
    """The `Retry-After` value (whole seconds, at least 1, as HTTP's delta-seconds) a failure with `exc` carries;
    None when it gives no advice."""
    seconds = getattr(exc, "retry_after_s", None) if isinstance(exc, InternVLError) else None
    if seconds is None:
        return None
    return str(max(1, math.ceil(seconds)))
