"""OpenTelemetry tracing for every process: one trace per request across the gateway, the vision and the LLM services.

Off by default. It is on when a process is given `--otlp-endpoint` or the standard OpenTelemetry environment names an
exporter (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or `OTEL_TRACES_EXPORTER=otlp`);
`OTEL_SDK_DISABLED=true` keeps it off. Then `configure_tracing` installs the SDK's tracer provider with a batching
OTLP/gRPC exporter (the other `OTEL_*` variables — service name, resource attributes, sampler, batch delays, headers
— are the SDK's and apply as documented there), and the gRPC servers get OpenTelemetry's server interceptor, which
continues the W3C `traceparent` a call's metadata carries (the gateway's calls set it: `services.runtime.calls`).
Off, no interceptor is installed and every span this
project starts is the API's non-recording span, so it costs a function call. The gateway's HTTP API is traced by
OpenTelemetry's aiohttp server instrumentation, which continues a caller's `traceparent` header.

Span names and attributes use OpenTelemetry's `gen_ai.*` conventions where they exist (`gen_ai.usage.input_tokens`,
...) and `internvl.*` otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence

import grpc
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanContext

log = logging.getLogger(__name__)

TRACER_NAME = "internvl-serve"
REQUEST_ID_ATTRIBUTE = "internvl.request_id"
# Calls that are not a request's work: probes and reflection make no spans.
_UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")

_enabled = False


def exporter_configured(otlp_endpoint: str | None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether tracing is on: an endpoint flag, or the OpenTelemetry environment asking for an OTLP exporter."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if otlp_endpoint:
        return True
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() in ("otlp",):
        return True
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def configure_tracing(service: str, otlp_endpoint: str | None):
    """Installs the tracer provider of this process when tracing is on; returns it (shut it down at exit to flush the
    last spans), or None when tracing is off. `service` names the process (`service.name`, unless
    `OTEL_SERVICE_NAME` says otherwise)."""
    global _enabled
    if not exporter_configured(otlp_endpoint):
        return None
    # Imported only when tracing is on: the SDK and the exporter are not needed otherwise.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or f"internvl-{service}"})
    provider = TracerProvider(resource=resource)
    exporter = OTLPSpanExporter(endpoint=otlp_endpoint) if otlp_endpoint else OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    # aiohttp applications made from now on get OpenTelemetry's middleware first: a span per HTTP request,
    # continuing the caller's `traceparent` (the gateway's OpenAI API).
    from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor

    AioHttpServerInstrumentor().instrument()
    _enabled = True
    log.info("tracing to %s", otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
             or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "the OTLP default endpoint")
    return provider


@contextlib.contextmanager
def traced_process(service: str, otlp_endpoint: str | None) -> Iterator[None]:
    """Tracing configured for the block (a server's lifetime); its last spans flushed when it ends."""
    provider = configure_tracing(service, otlp_endpoint)
    try:
        yield
    finally:
        if provider is not None:
            provider.shutdown()


def enabled() -> bool:
    return _enabled


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """OpenTelemetry's server interceptor (a span per call, the caller's context continued), or none when off."""
    if not _enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    return [aio_server_interceptor(filter_=filters.negate(filters.any_of(
        *(filters.service_name(name) for name in _UNTRACED_SERVICES))))]


def _present(attributes: Mapping[str, object]) -> dict[str, object]:
    """`attributes` without the None values (OpenTelemetry refuses None)."""
    return {k: v for k, v in attributes.items() if v is not None}


def set_attributes(attributes: Mapping[str, object], span: Span | None = None) -> None:
    """Sets `attributes` (None values left out) on `span` or the current span."""
    span = span if span is not None else trace.get_current_span()
    if span.is_recording():
        span.set_attributes(_present(attributes))


def wall_ns(monotonic_s: float) -> int:
    """A `time.monotonic()` reading as epoch nanoseconds, what span timestamps are."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


def record_span(name: str, start_monotonic: float, end_monotonic: float, attributes: Mapping[str, object] = {},
                links: Sequence[SpanContext] = ()) -> SpanContext:
    """A span, child of the current one, of a phase that has already happened (times from `time.monotonic()`):
    phases measured inside the engines (a queue wait, a prefill) are recorded when their request ends."""
    if not _enabled:
        return trace.INVALID_SPAN_CONTEXT
    span = tracer().start_span(name, start_time=wall_ns(start_monotonic), links=[Link(c) for c in links if c.is_valid],
                               attributes=_present(attributes))
    span.end(end_time=wall_ns(end_monotonic))
    return span.get_span_context()
