"""Request ids and the tracing switch, as units: which ids are kept, how one is adopted, when tracing is on."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.runtime import calls, request_ids, tracing
from services.runtime.logs import REQUEST_ID, request_scope
from services.runtime.request_metrics import RequestMetrics


@pytest.mark.parametrize("candidate", ["abc-123", "4bf92f3577b34da6a3ce929d0e0e4736", "x" * 128, "a.b/c:d=e"])
def test_a_usable_id_is_kept(candidate):
    assert request_ids.accepted(candidate) == candidate


@pytest.mark.parametrize("candidate", [None, "", "has space", "x" * 129, "tab\tin", "é", "line\nbreak"])
def test_an_unusable_id_is_replaced_by_a_new_one(candidate):
    made = request_ids.accepted(candidate)
    assert made != candidate and len(made) == 32 and int(made, 16) >= 0
    assert request_ids.accepted(candidate) != made, "each new id is different"


def test_from_metadata_reads_the_header_in_either_form():
    assert request_ids.from_metadata((("user-agent", "x"), ("x-request-id", "r1"))) == "r1"
    assert request_ids.from_metadata((("x-request-id", b"r2"),)) == "r2"
    assert request_ids.from_metadata((("other", "v"),)) is None and request_ids.from_metadata(None) is None


def test_adopt_prefers_the_metadata_then_the_field():
    with request_scope("from-metadata"):
        assert request_ids.adopt("from-field", (("x-request-id", "from-metadata"),)) == "from-metadata"
    with request_scope("minted"):
        assert request_ids.adopt("", ()) == "minted"

    async def call():  # a call's own task, as a gRPC handler's
        with request_scope("minted"):
            assert request_ids.adopt("from-field", ()) == "from-field"
            return REQUEST_ID.get()

    assert asyncio.run(call()) == "from-field"
    assert REQUEST_ID.get() == ""


def test_track_binds_the_id_and_sets_it_on_the_current_span():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    metrics = RequestMetrics("t_")
    with provider.get_tracer("test").start_as_current_span("call"):
        with metrics.track("Chat", "given-1") as call:
            assert (call.request_id, REQUEST_ID.get()) == ("given-1", "given-1")
        with metrics.track("Chat", "not valid") as call:
            assert REQUEST_ID.get() == call.request_id != "not valid"
    assert REQUEST_ID.get() == ""
    (span,) = exporter.get_finished_spans()
    assert span.attributes[tracing.REQUEST_ID_ATTRIBUTE] == call.request_id  # the last one set wins
    assert metrics.total.labels("Chat", "OK")._value.get() == 2


@pytest.mark.parametrize(("endpoint", "environ", "on"), [
    (None, {}, False),
    ("http://collector:4317", {}, True),
    (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, True),
    (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"}, True),
    (None, {"OTEL_TRACES_EXPORTER": "otlp"}, True),
    (None, {"OTEL_TRACES_EXPORTER": "none"}, False),
    ("http://collector:4317", {"OTEL_SDK_DISABLED": "true"}, False),
])
def test_tracing_is_on_only_when_an_exporter_is_named(endpoint, environ, on):
    assert tracing.exporter_configured(endpoint, environ) is on


def test_off_means_no_interceptors_and_no_spans():
    assert not tracing.enabled()  # no test process configures the global provider
    assert tracing.server_interceptors() == []
    assert not tracing.record_span("x", 0.0, 1.0).is_valid
    with request_scope("r-1"), calls.outgoing("internvl.llm.v1.LLMService/Generate", "10.0.0.1:50051") as metadata:
        assert metadata == (("x-request-id", "r-1"),)
    with calls.outgoing("internvl.llm.v1.LLMService/Generate") as metadata:
        assert metadata == ()


def test_an_outgoing_call_is_a_client_span_whose_context_the_metadata_carries(monkeypatch):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_enabled", True)
    monkeypatch.setattr(tracing, "tracer", lambda: provider.get_tracer("test"))
    with provider.get_tracer("test").start_as_current_span("request") as request, request_scope("r-2"):
        with calls.outgoing("internvl.vision.v1.VisionService/Encode", "10.0.0.2:50052") as metadata:
            pass
        with pytest.raises(KeyError), calls.outgoing("internvl.vision.v1.VisionService/Lookup"):
            raise KeyError("failed")
    sent = dict(metadata)
    assert sent["x-request-id"] == "r-2"
    encode, lookup, _ = exporter.get_finished_spans()
    assert (encode.name, encode.kind.name, encode.parent.span_id) == (
        "internvl.vision.v1.VisionService/Encode", "CLIENT", request.get_span_context().span_id)
    # W3C traceparent: version-trace id-span id-flags, naming the client span as the service's parent.
    context = encode.context
    assert sent["traceparent"] == f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
    assert encode.attributes["rpc.method"] == "Encode" and encode.attributes["server.address"] == "10.0.0.2:50052"
    assert lookup.status.status_code.name == "ERROR" and lookup.events[0].name == "exception"
