"""Domain errors shared by the services. Transport-free: one interceptor maps them to gRPC status codes."""


class InternVLError(Exception):
    """Base of every error the project raises on purpose; its message is safe to show a caller."""


class InvalidMediaError(InternVLError, ValueError):
    """Media bytes that cannot be decoded, are empty, or exceed a configured limit."""


class CheckpointError(InternVLError):
    """A checkpoint directory that cannot be loaded: the message names the file and the problem."""
