"""Domain errors shared by the services. Transport-free: `services.common.grpc_errors` maps them to gRPC statuses
in one interceptor. Every message here is written for the caller and is safe to return to them."""

from __future__ import annotations

import enum


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


class InternVLError(Exception):
    """Base of every error the project raises on purpose; its message is safe to show a caller."""

    code = ErrorCode.INTERNAL

    def __init__(self, message: str, *, item_index: int | None = None):
        super().__init__(message)
        self.item_index = item_index


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


class CheckpointError(InternVLError):
    """A checkpoint directory that cannot be loaded: the message names the file and the problem."""
