"""The OpenAI-compatible HTTP API against fake services: request parsing, responses, SSE, and error statuses."""

from __future__ import annotations

import base64
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.chat_request import MultiImageMode
from gateway.openai_http import create_app, parse_request
from services.common.contract.errors import InvalidArgumentError

pytestmark = pytest.mark.timeout(60)


def user(content) -> dict:
    return {"role": "user", "content": content}


def test_parse_conversation_into_turns():
    body = {"messages": [{"role": "system", "content": "Be brief."},
                         user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                               {"type": "text", "text": "What is it?"}]),
                         {"role": "assistant", "content": "A cat."},
                         user("Colour?"), user([{"type": "image_url", "image_url": {"url": "pics/b.png"}}])],
            "max_tokens": 7, "temperature": 0, "stop": "END", "seed": 3, "logprobs": True, "top_logprobs": 2,
            "top_k": 5, "max_num": 4, "multi_image_mode": "combined", "session_id": "s1"}
    request, stream, include_usage, top = parse_request(body)
    assert (stream, include_usage, top) == (False, False, 2)
    assert request.system_message == "Be brief."
    assert len(request.history) == 1 and request.history[0].assistant_text == "A cat."
    assert request.history[0].user[0].image.url.startswith("data:")
    assert [p.text for p in request.content] == ["Colour?", None]
    assert request.content[1].image.path == "pics/b.png"
    s = request.sampling
    assert (s.max_new_tokens, s.temperature, s.stop_strings, s.seed, s.top_logprobs, s.top_k) == (
        7, 0.0, ("END",), 3, 2, 5)
    assert (request.max_num, request.multi_image_mode, request.session_id) == (4, MultiImageMode.COMBINED, "s1")
    # OpenAI's defaults: temperature 1, no logprobs.
    request, *_ , top = parse_request({"messages": [user("hi")]})
    assert request.sampling.temperature == 1.0 and request.sampling.top_logprobs == 0 and top == -1


@pytest.mark.parametrize(("body", "message"), [
    ({}, "messages must be a non-empty list"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "must follow a user message"),
    ({"messages": [user("a"), {"role": "assistant", "content": "b"}]}, "last message must be a user message"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "unsupported role"),
    ({"messages": [user([{"type": "audio"}])]}, "unsupported part type"),
    ({"messages": [user("a")], "n": 2}, "only n = 1"),
    ({"messages": [user("a")], "top_logprobs": 2}, "requires logprobs"),
    ({"messages": [user("a")], "temperature": "hot"}, "temperature has the wrong type"),
    ({"messages": [user("a")], "multi_image_mode": "mosaic"}, "multi_image_mode"),
    ({"messages": [user([{"type": "video", "video": {"num_segments": 4}}])]}, "needs a url"),
])
def test_parse_rejects(body, message):
    with pytest.raises(InvalidArgumentError, match=message):
        parse_request(body)


async def _client(stack) -> TestClient:
    client = TestClient(TestServer(create_app(stack.orchestrator, stack.metrics, lambda: True)))
    await client.start_server()
    return client


@pytest.mark.asyncio
async def test_completion_stream_and_errors(fakes):
    async with fakes.stack() as stack:
        client = await _client(stack)
        try:
            url = "data:image/png;base64," + base64.b64encode(fakes.png(64, 64)).decode()
            messages = [user([{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": url}}])]
            reply = await client.post("/v1/chat/completions", json={"messages": messages, "temperature": 0,
                                                                    "logprobs": True, "top_logprobs": 1})
            body = await reply.json()
            assert reply.status == 200, body
            choice = body["choices"][0]
            assert choice["message"] == {"role": "assistant", "content": "a b c"}
            assert choice["finish_reason"] == "stop"
            assert [e["token_id"] for e in choice["logprobs"]["content"]] == [1, 2, 3]
            assert [len(e["top_logprobs"]) for e in choice["logprobs"]["content"]] == [1, 1, 1]
            assert body["usage"]["internvl"]["image_tiles"] == [1]
            assert body["usage"]["total_tokens"] == 103
            session = body["session_id"]

            reply = await client.post("/v1/chat/completions", json={
                "messages": [user("More")], "session_id": session, "stream": True,
                "stream_options": {"include_usage": True}})
            assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/event-stream")
            events = [line[len("data: "):] for line in (await reply.text()).splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
            assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "a b c"
            assert chunks[-1]["usage"]["internvl"]["reused_tiles"] == 1
            assert len(stack.llm.starts[-1].history) == 1

            video = "data:video/mp4;base64," + base64.b64encode(fakes.video(frames=12, fps=6)).decode()
            part = {"type": "video", "video": {"url": video, "num_segments": 3, "bound": [0, 1.5]}}
            reply = await client.post("/v1/chat/completions", json={"messages": [user([part, {
                "type": "text", "text": "What happens?"}])]})
            body = await reply.json()
            assert reply.status == 200, body
            assert body["usage"]["internvl"]["image_tiles"] == [1, 1, 1]
            assert stack.llm.starts[-1].user_parts[0].WhichOneof("part") == "video"

            for body, status, code in [
                ({"messages": [user([{"type": "video", "video": {"url": "data:video/mp4,xx"}}])]}, 400,
                 "invalid_argument"),
                ({"messages": [user("x")], "session_id": "missing"}, 404, "not_found"),
                ({"messages": [user([{"type": "image_url", "image_url": {"url": "/etc/passwd"}}])]}, 403,
                 "permission_denied"),
                ({"messages": []}, 400, "invalid_argument"),
            ]:
                reply = await client.post("/v1/chat/completions", json=body)
                error = (await reply.json())["error"]
                assert (reply.status, error["code"]) == (status, code), error
            reply = await client.post("/v1/chat/completions", data=b"{not json")
            assert reply.status == 400

            models = await (await client.get("/v1/models")).json()
            assert [m["id"] for m in models["data"]] == ["fake"]
            assert (await client.get("/health")).status == 200
            rpc = "openai.chat_completions"
            assert stack.metrics.requests.total.labels(rpc, "OK")._value.get() == 3
            assert stack.metrics.requests.total.labels(rpc, "NOT_FOUND")._value.get() == 1
        finally:
            await client.close()
