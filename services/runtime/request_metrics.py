"""Request metrics every service exports the same way: count by method and final status, latency, in flight.

`RequestMetrics` creates, in a service's registry and under its prefix:

- `<prefix>requests_total{method,code}`: requests by method and the gRPC status name they ended with,
- `<prefix>request_seconds{method}`: their latency (a histogram; a stream's lasts until its last message),
- `<prefix>in_flight_requests{method}`: requests being answered now.

`RequestMetricsInterceptor` records every call of a server's own services through `RequestMetrics.track` (health
checks and reflection are left out, so probes do not drown the traffic); `GrpcServer` installs it outside every
interceptor but tracing's, so the status recorded is the one that went on the wire, refusals of the interceptors
after it included. The gateway's HTTP API records into the same families through the same `track`.

`track` also gives the request its id (`services.runtime.request_ids`: the caller's `x-request-id`, or a new one),
bound for every log line of the request and set on its span, and logs one access line when it ends
(`internvl.access`: method, status, seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.contract.errors import RpcStatus, rpc_status
from services.runtime import request_ids, tracing
from services.runtime.logs import request_scope

access_log = logging.getLogger("internvl.access")

# From a cache lookup (milliseconds) to a long generation stream (minutes; the gateway's default deadline is 300 s).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                   300.0)


class RequestCall:
    """One request being recorded. `code` is the status name it will be counted under; set it when a transport
    answers a failure itself (the HTTP API turns errors into bodies), otherwise `track` derives it."""

    def __init__(self, request_id: str) -> None:
        self.code = RpcStatus.OK.name
        self.request_id = request_id


class RequestMetrics:
    """The request families of one service, in its registry."""

    def __init__(self, prefix: str, registry: CollectorRegistry | None = None,
                 on_done: Callable[[str, str, float], None] | None = None) -> None:
        """`on_done(method, code, seconds)` is called as each request is counted, in its context (the gateway's
        per-tenant metrics read the tenant there)."""
        self.on_done = on_done
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.total = Counter(prefix + "requests", "Requests by method and final gRPC status code", ["method", "code"],
                             registry=r)
        self.seconds = Histogram(prefix + "request_seconds", "Request latency by method (streams: to their end)",
                                 ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge(prefix + "in_flight_requests", "Requests being answered now", ["method"], registry=r)

    @contextlib.contextmanager
    def track(self, method: str, request_id: str | None = None) -> Iterator[RequestCall]:
        """Records one request: in flight while the block runs, then counted by its status, timed and logged, its
        request id (`request_id` if usable, else a new one: `call.request_id`) bound meanwhile.

        An exception leaving the block sets the status from the error table (a cancellation is CANCELLED), unless
        the block already set `call.code` to something other than OK.
        """
        call = RequestCall(request_ids.accepted(request_id))
        started = time.perf_counter()
        self.in_flight.labels(method).inc()
        with request_scope(call.request_id):
            tracing.set_attributes({tracing.REQUEST_ID_ATTRIBUTE: call.request_id})
            try:
                yield call
            except BaseException as exc:
                if call.code == RpcStatus.OK.name:
                    call.code = rpc_status(exc).name
                raise
            finally:
                seconds = time.perf_counter() - started
                self.in_flight.labels(method).dec()
                self.total.labels(method, call.code).inc()
                self.seconds.labels(method).observe(seconds)
                if self.on_done is not None:
                    self.on_done(method, call.code, seconds)
                access_log.info("%s %s %.3f s", method, call.code, seconds)


def _grpc_outcome(call: RequestCall, context: grpc.aio.ServicerContext, exc: BaseException | None) -> None:
    """Sets the status the call ended with: what the handler (or an interceptor) aborted with or set, else derived."""
    code = context.code()
    if code is not None and code != grpc.StatusCode.OK:
        call.code = code.name
    elif isinstance(exc, asyncio.CancelledError):
        # gRPC cancels the handler both when the client cancels and when the deadline passes; tell them apart.
        remaining = context.time_remaining()
        call.code = (RpcStatus.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0
                     else RpcStatus.CANCELLED).name
    elif exc is not None:
        call.code = rpc_status(exc).name


def _wrap_unary_response(metrics: RequestMetrics, behavior, method: str):
    async def wrapper(request, context):
        with metrics.track(method, request_ids.from_metadata(context.invocation_metadata())) as call:
            try:
                response = await behavior(request, context)
            except BaseException as exc:
                _grpc_outcome(call, context, exc)
                raise
            _grpc_outcome(call, context, None)
            return response

    return wrapper


def _wrap_stream_response(metrics: RequestMetrics, behavior, method: str):
    async def wrapper(request, context):
        with metrics.track(method, request_ids.from_metadata(context.invocation_metadata())) as call:
            try:
                async for response in behavior(request, context):
                    yield response
            except BaseException as exc:
                _grpc_outcome(call, context, exc)
                raise
            _grpc_outcome(call, context, None)

    return wrapper


class RequestMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Records every call to the named services (`package.Service`) into `metrics`, by short method name."""

    def __init__(self, metrics: RequestMetrics, service_names: Iterable[str]) -> None:
        self.metrics = metrics
        self.prefixes = tuple(f"/{name}/" for name in service_names)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        full = handler_call_details.method
        if handler is None or not full.startswith(self.prefixes):
            return handler
        method = full.rsplit("/", 1)[-1]
        if handler.unary_unary or handler.stream_unary:
            behavior = handler.unary_unary or handler.stream_unary
            factory = (grpc.unary_unary_rpc_method_handler if handler.unary_unary
                       else grpc.stream_unary_rpc_method_handler)
            wrapped = _wrap_unary_response(self.metrics, behavior, method)
        else:
            behavior = handler.unary_stream or handler.stream_stream
            if not inspect.isasyncgenfunction(behavior):
                return handler  # a handler writing through context.write: nothing to wrap it with
            factory = (grpc.unary_stream_rpc_method_handler if handler.unary_stream
                       else grpc.stream_stream_rpc_method_handler)
            wrapped = _wrap_stream_response(self.metrics, behavior, method)
        return factory(wrapped, handler.request_deserializer, handler.response_serializer)
