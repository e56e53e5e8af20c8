"""Request ids: what a caller can quote about one request, carried to every service it reaches.

A request id comes from the caller (`x-request-id`: an HTTP header or gRPC metadata) or is minted by the first
server that sees the request without one. Every server echoes it (`x-request-id` in the response headers / initial
metadata), binds it for the request's log lines (`services.runtime.logs.request_scope`) and sets it on the request's
span; the gateway sends it on to the services with every call (`services.runtime.calls.outgoing`).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable

from services.runtime import tracing
from services.runtime.logs import REQUEST_ID

HEADER = "x-request-id"
# What is accepted from a caller as is: printable ASCII without spaces, as long as a UUID or a trace id with room.
_VALID = re.compile(r"[!-~]{1,128}")


def new_request_id() -> str:
    return uuid.uuid4().hex


def accepted(candidate: str | None) -> str:
    """`candidate` if it is a usable request id, otherwise a new one (an id is for logs: a bad one is replaced, not
    refused)."""
    return candidate if candidate and _VALID.fullmatch(candidate) else new_request_id()


def from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The `x-request-id` of gRPC invocation metadata, if any."""
    for key, value in metadata or ():
        if key == HEADER:
            return value if isinstance(value, str) else value.decode("ascii", "replace")
    return None


def adopt(field: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The call's request id: its `x-request-id` metadata (bound when the call began), else `field` (a request
    message's own id field, for callers that set that instead), else the id made for the call. Adopting `field` binds
    it for the rest of the call's task, and sets it on the call's span."""
    if field and from_metadata(metadata) is None:
        REQUEST_ID.set(accepted(field))  # this call's task only: the id is the call's for the rest of its life
        tracing.set_attributes({tracing.REQUEST_ID_ATTRIBUTE: REQUEST_ID.get()})
    return REQUEST_ID.get()
