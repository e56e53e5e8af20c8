"""One request across three processes: OpenTelemetry traces, request ids and JSON logs, on real processes.

`internvl-serve --log-format json up --otlp-endpoint ...` runs Redis, the vision service, the LLM service and the
gateway; their OTLP exporters point at an OTLP trace receiver inside this test, built on the `opentelemetry-proto`
package's own trace service (the SDK's batch delay shortened through its standard `OTEL_BSP_SCHEDULE_DELAY`). One image chat must be one trace with spans from the
three services, parent links and attributes right; over HTTP a caller's `traceparent` must be continued; a caller's
request id must come back from both APIs and appear in all three services' logs.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import urllib.request
from collections import defaultdict
from concurrent import futures

import grpc
import pytest
from helpers.chat import image_part, text_part
from internvl.gateway.v1 import gateway_pb2 as G
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from procs import wait_for
from stack import up_stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Every span exported to it, with its process's service.name."""

    def __init__(self):
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope in resource_spans.scope_spans:
                    self.spans += [(service, span) for span in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: bytes) -> list[tuple[str, object]]:
        with self.lock:
            return [(s, span) for s, span in self.spans if span.trace_id == trace_id]

    def wait_for(self, predicate, timeout_s: float = 20.0):
        try:
            return wait_for(predicate, timeout_s, "spans", interval_s=0.1)
        except AssertionError:
            with self.lock:
                seen = sorted({(s, span.name) for s, span in self.spans})
            pytest.fail(f"spans did not arrive in time; seen: {seen}")


def attributes(span) -> dict:
    out = {}
    for a in span.attributes:
        value = a.value
        kind = value.WhichOneof("value")
        out[a.key] = ([v.string_value for v in value.array_value.values] if kind == "array_value"
                      else getattr(value, kind))
    return out


@pytest.fixture(scope="module")
def receiver():
    servicer = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(0)


@pytest.fixture(scope="module")
def stack(tiny_checkpoint, receiver, tmp_path_factory):
    _, otlp_port = receiver
    with up_stack(tiny_checkpoint(), tmp_path_factory.mktemp("traced-logs"), "--otlp-endpoint",
                  f"http://127.0.0.1:{otlp_port}", cli_flags=["--log-format", "json"],
                  env={"OTEL_BSP_SCHEDULE_DELAY": "100"}) as running:
        yield running


@pytest.fixture(scope="module")
def png(golden_dir) -> bytes:
    return (golden_dir / "small_120x90.png").read_bytes()


def test_one_image_chat_is_one_trace_across_the_three_services(stack, receiver, png):
    spans_of, _ = receiver
    responses = stack.stub.Chat(G.ChatRequest(content=[image_part(png), text_part("What?")],
                                              sampling=G.SamplingParams(max_new_tokens=5)),
                                metadata=(("x-request-id", "trace-me-1"),), timeout=60)
    messages = list(responses)
    echoed = dict(responses.initial_metadata())["x-request-id"]
    finish = messages[-1].finish
    tokens = sum(len(m.delta.token_ids) for m in messages if m.HasField("delta"))
    assert echoed == finish.request_id == "trace-me-1"

    def root():
        return next((span for service, span in spans_of.spans
                     if service == "internvl-gateway" and span.kind == SERVER and span.name.endswith("/Chat")
                     and attributes(span).get("internvl.request_id") == "trace-me-1"), None)

    gateway_span = spans_of.wait_for(root)

    def complete():
        spans = spans_of.trace(gateway_span.trace_id)
        names = {(s, span.name) for s, span in spans}
        wanted = {("internvl-vision", "vision.encode"), ("internvl-llm", "llm.decode"),
                  ("internvl-llm", "llm.prefill"), ("internvl-gateway", "media.plan")}
        return spans if wanted <= names else None

    spans = spans_of.wait_for(complete)
    by_id = {span.span_id: (service, span) for service, span in spans}
    assert gateway_span.parent_span_id == b"", "the gateway's Chat span is the trace's root"
    assert {service for service, _ in spans} == {"internvl-gateway", "internvl-vision", "internvl-llm"}

    def server_span(service: str, method: str):
        (found,) = [span for s, span in spans if s == service and span.kind == SERVER and span.name.endswith(method)]
        return found

    def parent_of(span):
        return by_id[span.parent_span_id]

    # Each service's server span is the child of the gateway's client span for that call, itself under the root.
    for service, method in (("internvl-vision", "/Encode"), ("internvl-vision", "/Lookup"),
                            ("internvl-llm", "/Generate")):
        span = server_span(service, method)
        caller_service, caller = parent_of(span)
        assert (caller_service, caller.kind) == ("internvl-gateway", CLIENT) and caller.name.endswith(method)
        assert caller.parent_span_id == gateway_span.span_id
        assert attributes(span)["internvl.request_id"] == "trace-me-1"

    generate = server_span("internvl-llm", "/Generate")
    assert attributes(generate)["gen_ai.usage.output_tokens"] == tokens
    assert attributes(generate)["gen_ai.usage.input_tokens"] == finish.usage.prompt_tokens
    assert attributes(generate)["gen_ai.latency.time_to_first_token"] > 0
    phases = {span.name: span for s, span in spans if span.parent_span_id == generate.span_id}
    assert {"llm.queue", "llm.prefill", "llm.decode"} <= set(phases)
    assert phases["llm.queue"].end_time_unix_nano <= phases["llm.prefill"].start_time_unix_nano + 1_000_000
    assert attributes(gateway_span)["gen_ai.usage.output_tokens"] == tokens
    assert attributes(gateway_span)["internvl.encoded_tiles"] == finish.usage.encoded_tiles > 0

    # The request's encode links to the shared batch span (a trace of its own: one batch serves many requests).
    encode = next(span for s, span in spans if span.name == "vision.encode")
    assert parent_of(encode)[1].span_id == server_span("internvl-vision", "/Encode").span_id
    (link,) = encode.links
    batch = spans_of.wait_for(lambda: next((span for _, span in spans_of.spans if span.span_id == link.span_id),
                                           None))
    assert batch.name == "vision.encode_batch" and batch.trace_id != gateway_span.trace_id
    assert attributes(batch)["internvl.tiles"] >= 1


def test_http_continues_the_callers_trace_and_the_request_id_is_in_every_log(stack, receiver, png, tiny_checkpoint):
    spans_of, _ = receiver
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    body = {"model": tiny_checkpoint().name, "max_tokens": 3, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
        {"type": "text", "text": "And this, in the HTTP API?"}]}]}
    request = urllib.request.Request(f"http://127.0.0.1:{stack.http_port}/v1/chat/completions",
                                     data=json.dumps(body).encode(), method="POST", headers={
                                         "Content-Type": "application/json", "x-request-id": "http-req-7",
                                         "traceparent": f"00-{trace_id}-{parent_id}-01"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert reply.headers["x-request-id"] == "http-req-7"
        json.loads(reply.read())

    def continued():
        # Both server spans: the client spans of the gateway's calls may arrive before its HTTP span has ended.
        spans = spans_of.trace(bytes.fromhex(trace_id))
        servers = {service for service, span in spans if span.kind == SERVER}
        return spans if {"internvl-gateway", "internvl-llm"} <= servers else None

    spans = spans_of.wait_for(continued)
    http_span = next(span for service, span in spans if service == "internvl-gateway" and span.kind == SERVER)
    assert http_span.parent_span_id == bytes.fromhex(parent_id), "the caller's span is the HTTP span's parent"
    assert attributes(http_span)["internvl.request_id"] == "http-req-7"
    generate = next(span for s, span in spans if s == "internvl-llm" and span.kind == SERVER)
    assert attributes(generate)["internvl.request_id"] == "http-req-7"

    # Every service's log has lines about this request (JSON, one object per line, all parseable).
    def read_logs():
        lines_by_service = defaultdict(list)
        for name, file in (("gateway", "gateway"), ("vision", "vision-0"), ("llm", "llm")):
            for line in (stack.logs / f"{file}.log").read_text().splitlines():
                if not line.startswith("{"):
                    continue  # a child's non-logging output (none expected, but the banner tools may print)
                entry = json.loads(line)
                assert {"time", "level", "service", "message"} <= set(entry)
                lines_by_service[name].append(entry)
        mentioned = all(any(e.get("request_id") == "http-req-7" for e in lines_by_service[name])
                        for name in ("gateway", "vision", "llm"))
        return lines_by_service if mentioned else None

    # The last access lines are written as the streams close: polled, and then asserted on below.
    lines_by_service = wait_for(read_logs, 10, "log lines with the request id")
    for name in ("gateway", "vision", "llm"):
        mine = [e for e in lines_by_service[name] if e.get("request_id") == "http-req-7"]
        assert mine, f"no {name} log line carries the request id"
        assert all(e["service"] == name for e in lines_by_service[name])
        assert any(re.fullmatch(trace_id, e.get("trace_id", "")) for e in mine), f"{name}: no trace id in its lines"
