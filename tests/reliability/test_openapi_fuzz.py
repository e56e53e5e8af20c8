"""The OpenAI-compatible HTTP API fuzzed from its own OpenAPI document (`GET /openapi.json`) with Schemathesis.

The gateway is real (its aiohttp app on a port, the orchestrator, the gRPC clients), on an event loop of its own,
with the fake vision and LLM services behind it (tests/helpers/fakes.py) and a media root holding one picture.
Schemathesis generates bodies that follow the document (positive) and bodies that break it (negative); for each:
no 5xx; the status, content type and body as the document says (error bodies are its `ErrorResponse`, closed); every
event of a stream a `ChatCompletionChunk` (or an `ErrorResponse`), ended by `[DONE]`; no error message showing the
server's insides. After each operation's run the gateway still answers a good request, nothing was counted
INTERNAL and nothing is left in flight.

Bounded here (a few hundred cases, about half a minute on 2 cores); `make fuzz` runs many more (FUZZ_SCALE).
"""

from __future__ import annotations

import json

import pytest
import requests
import schemathesis
from helpers.background import in_background
from helpers.fakes import fake_http_gateway
from helpers.fuzzing import fuzz_settings, leaks, timeout_s
from helpers.media import png
from hypothesis import given
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.openai.responses import ChatCompletionChunk, ErrorResponse

pytestmark = pytest.mark.timeout(timeout_s(300))

RPC = "openai.chat_completions"
# What the document promises. Not `positive_data_acceptance` / `negative_data_rejection`: the document gives each
# field's type, not every rule (sampling ranges, a known model id, decodable media), which the API checks after it.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
# (method, path, mode, examples): the chat completion is where the input is; the others take none.
OPERATIONS = [
    ("POST", "/v1/chat/completions", POSITIVE, 150),
    ("POST", "/v1/chat/completions", NEGATIVE, 100),
    ("GET", "/v1/models", POSITIVE, 5),
    ("HEAD", "/v1/models", POSITIVE, 3),
    ("GET", "/health", POSITIVE, 5),
    ("HEAD", "/health", POSITIVE, 3),
    ("GET", "/openapi.json", POSITIVE, 3),
    ("HEAD", "/openapi.json", POSITIVE, 3),
]
GOOD = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ok.png"}},
                                                  {"type": "text", "text": "What is it?"}]}]}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-media")
    (root / "ok.png").write_bytes(png(64, 48))
    with in_background(lambda: fake_http_gateway(media_root=root)) as running:
        yield running


@pytest.fixture(scope="module")
def schema(gateway):
    return schemathesis.openapi.from_url(gateway.url + "/openapi.json")


def check_stream(text: str) -> None:
    """Every event a chunk of the document's shape or an error body, and the stream ended by `[DONE]`."""
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", text[-500:]
    for event in events[:-1]:
        payload = json.loads(event)
        (ErrorResponse if "error" in payload else ChatCompletionChunk).model_validate(payload)


def check(case, response: requests.Response) -> None:
    case.validate_response(response, checks=CHECKS)
    sent = json.dumps(case.body, ensure_ascii=False) if isinstance(case.body, dict | list | str) else ""
    if response.status_code >= 400:
        message = response.json()["error"]["message"]
        assert not leaks(message, sent), f"{response.status_code} {message!r} shows {leaks(message, sent)}"
    if response.headers.get("Content-Type", "").startswith("text/event-stream") and case.method != "HEAD":
        check_stream(response.text)


def assert_still_serving(gateway) -> None:
    reply = requests.post(gateway.url + "/v1/chat/completions", json=GOOD, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "a b c"
    requests_metric = gateway.stack.metrics.requests
    assert requests_metric.total.labels(RPC, "INTERNAL")._value.get() == 0
    assert requests_metric.in_flight.labels(RPC)._value.get() == 0


def test_the_good_request_is_answered(gateway):
    """The fuzzing starts from a gateway that answers (else it would only test refusals)."""
    assert_still_serving(gateway)
    assert gateway.stack.llm.starts[-1].user_parts[0].WhichOneof("part") == "image"


@pytest.mark.parametrize(("method", "path", "mode", "count"), OPERATIONS,
                         ids=[f"{m} {p} {mode.value}" for m, p, mode, _ in OPERATIONS])
def test_operation_fuzzed(schema, gateway, method, path, mode, count):
    operation = schema[path][method]

    @fuzz_settings(count)
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case):
        check(case, case.call(timeout=60))

    fuzz()
    assert_still_serving(gateway)
