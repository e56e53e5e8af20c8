"""Gateway-specific domain errors, each with its own code (and so, through the shared table in
`services.contract.errors`, its own gRPC and HTTP status): an unknown session is NOT_FOUND, a busy one ABORTED,
a path outside the media root PERMISSION_DENIED, a body over the limit RESOURCE_EXHAUSTED (HTTP 413), a passed
deadline DEADLINE_EXCEEDED.
"""

from __future__ import annotations

from services.contract.errors import (
    EmbeddingsMissingError,
    ErrorCode,
    InternVLError,
    NotFoundError,
)


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
    """The caller's deadline passed while the gateway waited on a service."""

    code = ErrorCode.DEADLINE_EXCEEDED


class SessionMediaEvictedError(EmbeddingsMissingError):
    """Embeddings of an image from an earlier round were evicted; the gateway holds no pixels to re-encode them."""

    def __init__(self, missing_keys: list[str]):
        InternVLError.__init__(
            self,
            f"{len(missing_keys)} image(s) of this conversation's earlier rounds are no longer cached and cannot be "
            "re-encoded (sessions keep no pixels); start a new session or send those images again",
        )
        self.missing_keys = list(missing_keys)

