"""The chat completions handler against a scripted orchestrator: failures before and during a stream, the request
id on every response, the body limit, and what the request metrics record."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.chat_response import Delta, Finish
from gateway.metrics import GatewayMetrics
from gateway.openai.app import create_app
from services.contract.errors import InvalidMediaError, NotReadyError, ShedError
from services.contract.finish import FinishReason, Usage
from services.contract.priority import Priority

pytestmark = pytest.mark.timeout(60)
RPC = "openai.chat_completions"
BODY = {"messages": [{"role": "user", "content": "Hi"}], "model": "m1"}
TOO_LARGE = ("the request body is larger than the limit of 2000 bytes; send smaller media (the gateway's "
             "--max-media-bytes sets it)")


class ScriptedOrchestrator:
    """Answers every chat with `script`: events to yield, and an exception to raise where one is listed."""

    def __init__(self, *script):
        self.script = script
        self.config = SimpleNamespace(max_media_bytes=1000, api_token=None)
        self.model = None
        self.requests = []

    async def chat(self, request):
        self.requests.append(request)
        for step in self.script:
            if isinstance(step, BaseException):
                raise step
            yield step


def delta(text: str, token_id: int) -> Delta:
    return Delta(text=text, token_ids=(token_id,))


FINISH = Finish(FinishReason.STOP, Usage(prompt_tokens=5, completion_tokens=2), session_id="s1")


async def _post(orchestrator, body, headers=None):
    metrics = GatewayMetrics()
    client = TestClient(TestServer(create_app(orchestrator, metrics, lambda: True)))
    await client.start_server()
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        reply = await client.post("/v1/chat/completions", data=data, headers=headers or {})
        return reply.status, reply.headers, await reply.text(), metrics
    finally:
        await client.close()


def count(metrics: GatewayMetrics, code: str) -> float:
    return metrics.requests.total.labels(RPC, code)._value.get()


def events_of(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]


@pytest.mark.asyncio
async def test_a_stream_that_fails_midway_ends_with_an_error_event():
    orchestrator = ScriptedOrchestrator(delta("a", 1), InvalidMediaError("content[0] (image): cannot decode it"))
    status, headers, text, metrics = await _post(orchestrator, {**BODY, "stream": True}, {"x-request-id": "r-42"})
    assert (status, headers["Content-Type"], headers["x-request-id"]) == (200, "text/event-stream", "r-42")
    events = events_of(text)
    assert events[-1] == "[DONE]"
    role, content, error = (json.loads(e) for e in events[:-1])
    assert role["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
    assert content["choices"][0]["delta"] == {"content": "a"} and content["model"] == "m1"
    assert error == {"error": {"message": "content[0] (image): cannot decode it", "type": "invalid_request_error",
                               "param": None, "code": "invalid_argument"}}
    assert count(metrics, "INVALID_ARGUMENT") == 1 and count(metrics, "OK") == 0
    assert metrics.generated_tokens.labels(RPC)._value.get() == 1
    assert orchestrator.requests[0].request_id == "r-42"


@pytest.mark.asyncio
async def test_an_unexpected_failure_is_internal_and_not_leaked():
    for script in [(RuntimeError("secret /srv/path"),), (delta("a", 1), RuntimeError("secret /srv/path"))]:
        for stream in (False, True):
            status, headers, text, metrics = await _post(ScriptedOrchestrator(*script), {**BODY, "stream": stream})
            assert "secret" not in text and headers["x-request-id"]
            body = json.loads(events_of(text)[-2] if stream and len(script) == 2 else text)
            assert body["error"]["message"] == "internal error" and body["error"]["type"] == "server_error"
            # Before the first event even a stream is answered with the status; after it, with an error event.
            assert status == (200 if stream and len(script) == 2 else 500)
            assert count(metrics, "INTERNAL") == 1


@pytest.mark.asyncio
async def test_a_refused_body_never_reaches_the_orchestrator_and_is_counted():
    orchestrator = ScriptedOrchestrator(delta("a", 1), FINISH)
    for body, status, message in [
        ({**BODY, "tools": []}, 400, "tools is not supported: tool calling is not supported"),
        (b"{", 400, "the body is not valid JSON"),
        (b'{"messages": "' + b"x" * 3000 + b'"}', 413, TOO_LARGE),
    ]:
        got, headers, text, metrics = await _post(orchestrator, body)
        assert (got, json.loads(text)["error"]["message"]) == (status, message)
        assert headers["x-request-id"]
        assert count(metrics, "INVALID_ARGUMENT" if status == 400 else "RESOURCE_EXHAUSTED") == 1
        assert metrics.time_to_first_token.labels(RPC)._sum.get() == 0
    assert orchestrator.requests == []


@pytest.mark.asyncio
async def test_a_completion_reports_its_logprobs_and_time_to_first_token():
    orchestrator = ScriptedOrchestrator(delta("a", 1), delta(" b", 2), FINISH)
    status, _, text, metrics = await _post(orchestrator, {**BODY, "logprobs": True})
    body = json.loads(text)
    assert status == 200 and body["model"] == "m1" and body["session_id"] == "s1"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "a b"}
    assert body["choices"][0]["logprobs"] == {"content": []}  # the script's deltas carry no logprobs
    assert body["usage"]["total_tokens"] == 7
    assert count(metrics, "OK") == 1
    assert [s.value for s in metrics.time_to_first_token.collect()[0].samples if s.name.endswith("_count")] == [1]


@pytest.mark.asyncio
async def test_the_priority_header_reaches_the_request_and_a_bad_one_is_400_naming_the_allowed_values():
    orchestrator = ScriptedOrchestrator(delta("a", 1), FINISH)
    status, _, _, _ = await _post(orchestrator, BODY, {"X-Request-Priority": "Sheddable"})
    assert status == 200 and orchestrator.requests[-1].priority is Priority.SHEDDABLE
    status, _, _, _ = await _post(orchestrator, BODY)
    assert status == 200 and orchestrator.requests[-1].priority is None  # the default decides
    status, _, text, metrics = await _post(orchestrator, BODY, {"X-Request-Priority": "urgent"})
    assert status == 400 and len(orchestrator.requests) == 2
    assert json.loads(text)["error"]["message"] == ("X-Request-Priority: 'urgent' is not a priority; use one of "
                                                    "critical, standard, sheddable")
    assert count(metrics, "INVALID_ARGUMENT") == 1


@pytest.mark.asyncio
async def test_a_shed_request_is_503_with_retry_after():
    orchestrator = ScriptedOrchestrator(ShedError("the gateway is saturated", retry_after_s=4.5))
    status, headers, text, metrics = await _post(orchestrator, BODY, {"X-Request-Priority": "sheddable"})
    assert (status, headers["Retry-After"]) == (503, "5")
    assert json.loads(text)["error"]["code"] == "unavailable" and count(metrics, "UNAVAILABLE") == 1
    status, headers, _, _ = await _post(ScriptedOrchestrator(NotReadyError("loading")), BODY)
    assert status == 503 and "Retry-After" not in headers
