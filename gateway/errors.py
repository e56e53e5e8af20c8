"""Gateway-specific domain errors.

They subclass the shared errors, so the shared interceptor maps them sensibly on its own (INVALID_ARGUMENT,
FAILED_PRECONDITION, ...); the gateway's transports refine a few into the more precise status named by `status`
(NOT_FOUND for an unknown session, PERMISSION_DENIED for a path outside the media root).
"""

from __future__ import annotations

from services.common.errors import EmbeddingsMissingError, InternVLError, InvalidArgumentError, NotFoundError


class SessionNotFoundError(NotFoundError):
    """The session id is unknown, or the session expired (sessions live --session-ttl-s after their last turn)."""

    status = "NOT_FOUND"


class SessionBusyError(InvalidArgumentError):
    """Another turn of the same session is still running; a session answers one turn at a time."""

    status = "ABORTED"


class MediaAccessError(InvalidArgumentError):
    """A file path outside the media root, or file paths while the gateway has no media root."""

    status = "PERMISSION_DENIED"


class RequestTooLargeError(InvalidArgumentError):
    """A request body over the size limit (gRPC refuses such messages itself, with the same status)."""

    status = "RESOURCE_EXHAUSTED"
    http_status = 413


class DeadlineExceededError(InternVLError):
    """The caller's deadline passed while the gateway waited on a service."""

    status = "DEADLINE_EXCEEDED"


class SessionMediaEvictedError(EmbeddingsMissingError):
    """Embeddings of an image from an earlier round were evicted; the gateway holds no pixels to re-encode them."""

    def __init__(self, missing_keys: list[str]):
        InternVLError.__init__(
            self,
            f"{len(missing_keys)} image(s) of this conversation's earlier rounds are no longer cached and cannot be "
            "re-encoded (sessions keep no pixels); start a new session or send those images again",
        )
        self.missing_keys = list(missing_keys)


def grpc_status_name(exc: BaseException) -> str | None:
    """The precise gRPC status name for gateway errors that have one (None: the shared mapping applies)."""
    return getattr(exc, "status", None) if isinstance(exc, InternVLError) else None
