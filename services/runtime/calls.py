"""What every call from the gateway to a service carries: the request's id and, when tracing, the W3C trace context of
a client span covering the call.

Set on each call explicitly rather than by channel interceptors: grpc.aio's intercepted stream-stream calls can hang
when the calling task is cancelled in the middle of a write (a failing BatchChat question cancels its siblings' LLM
streams), so the gateway's channels carry no interceptors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.runtime import request_ids, tracing
from services.runtime.logs import REQUEST_ID

Metadata = tuple[tuple[str, str], ...]


@contextlib.contextmanager
def outgoing(method: str, address: str | None = None) -> Iterator[Metadata]:
    """The metadata of one call of `method` ("package.Service/Method") to `address`, within the block that makes it.

    With tracing on, the block is a CLIENT span (not made current: the caller's own spans stay siblings of it), whose
    context the metadata carries so the service's span continues it; a failure ends it with its gRPC status.
    """
    request_id = REQUEST_ID.get()
    own = ((request_ids.HEADER, request_id),) if request_id else ()
    if not tracing.enabled():
        yield own
        return
    service, _, name = method.rpartition("/")
    span = tracing.tracer().start_span(method, kind=SpanKind.CLIENT, attributes={
        "rpc.system": "grpc", "rpc.service": service, "rpc.method": name, "server.address": address or "",
        tracing.REQUEST_ID_ATTRIBUTE: request_id})
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    try:
        yield (*carrier.items(), *own)
    except BaseException as exc:
        if isinstance(exc, grpc.aio.AioRpcError):
            span.set_attribute("rpc.grpc.status_code", exc.code().value[0])
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        span.end()
