"""The OpenAI-compatible HTTP API against fake services: responses, SSE, error statuses and the request metrics."""

from __future__ import annotations

import base64
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer
from helpers.fakes import fake_stack
from helpers.media import png, write_video

from gateway.openai.app import create_app

pytestmark = pytest.mark.timeout(60)


def user(content) -> dict:
    return {"role": "user", "content": content}


async def _client(stack) -> TestClient:
    client = TestClient(TestServer(create_app(stack.orchestrator, stack.metrics, lambda: True)))
    await client.start_server()
    return client


@pytest.mark.asyncio
async def test_completion_stream_and_errors():
    async with fake_stack() as stack:
        client = await _client(stack)
        try:
            url = "data:image/png;base64," + base64.b64encode(png(64, 64)).decode()
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

            video = "data:video/mp4;base64," + base64.b64encode(write_video(frames=12, fps=6)).decode()
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
            # Refused while parsing (empty messages, not JSON) or by the orchestrator (the video): counted alike.
            assert stack.metrics.requests.total.labels(rpc, "INVALID_ARGUMENT")._value.get() == 3
            assert stack.metrics.requests.total.labels(rpc, "PERMISSION_DENIED")._value.get() == 1
        finally:
            await client.close()


@pytest.mark.asyncio
async def test_n_answers_as_choices_streaming_and_not():
    async with fake_stack() as stack:
        client = await _client(stack)
        try:
            reply = await client.post("/v1/chat/completions", json={"messages": [user("Hi")], "n": 3, "seed": 5})
            body = await reply.json()
            assert reply.status == 200, body
            assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in body["choices"]] == [
                (0, "a b c", "stop"), (1, "a b c 1", "stop"), (2, "a b c 2", "stop")]
            # OpenAI's usage: the prompt once, every answer's completion tokens.
            assert (body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]) == (100, 9)
            assert (stack.llm.starts[-1].sampling.n, stack.llm.starts[-1].sampling.seed) == (3, 5)

            # The session records answer 0.
            reply = await client.post("/v1/chat/completions", json={"messages": [user("More")],
                                                                    "session_id": body["session_id"]})
            assert reply.status == 200
            assert [t.assistant_text for t in stack.llm.starts[-1].history] == ["a b c"]

            reply = await client.post("/v1/chat/completions", json={
                "messages": [user("Hi")], "n": 2, "stream": True, "stream_options": {"include_usage": True}})
            events = [line[len("data: "):] for line in (await reply.text()).splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            texts, finished = {0: "", 1: ""}, []
            for c in chunks[:-1]:
                (choice,) = c["choices"]
                texts[choice["index"]] += choice["delta"].get("content", "")
                if choice["finish_reason"]:
                    finished.append(choice["index"])
            assert texts == {0: "a b c", 1: "a b c 1"} and sorted(finished) == [0, 1]
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
        finally:
            await client.close()


@pytest.mark.asyncio
async def test_bodies_no_handler_can_read_are_400_and_the_gateway_still_answers():
    """A lone surrogate in the text was a 500 (the conversation's routing key could not be encoded), and so was a body
    nested beyond the JSON parser's recursion limit."""
    lone = b'{"messages": [{"role": "user", "content": "Hi \\ud800"}]}'
    deep = b'{"messages": [{"role": "user", "content": "Hi"}], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    async with fake_stack() as stack:
        client = await _client(stack)
        try:
            for data, message in [(lone, "messages[0].content holds a lone UTF-16 surrogate (\\ud800)"),
                                  (deep, "the body is nested deeper than 64 levels of arrays and objects")]:
                reply = await client.post("/v1/chat/completions", data=data)
                error = (await reply.json())["error"]
                assert (reply.status, error["code"]) == (400, "invalid_argument"), error
                assert error["message"].startswith(message), error
            reply = await client.post("/v1/chat/completions", json={"messages": [user("Hi \ud83d\ude00")]})
            assert reply.status == 200, await reply.text()
            assert stack.metrics.requests.total.labels("openai.chat_completions", "INTERNAL")._value.get() == 0
        finally:
            await client.close()
