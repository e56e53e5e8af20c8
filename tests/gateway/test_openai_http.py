"""The OpenAI-compatible HTTP API against fake services: request parsing, responses, SSE, and error statuses."""

from __future__ import annotations

import base64
import json
import re

import pytest
from aiohttp.test_utils import TestClient, TestServer
from helpers.fakes import fake_stack
from helpers.media import png, write_video

from gateway.chat_request import ImageDetail, MultiImageMode
from gateway.openai_http import FIELDS, create_app, parse_request
from services.contract.constraint import Constraint, ConstraintKind
from services.contract.errors import InvalidArgumentError

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
    ({"messages": [user("a")], "n": 0}, "n must be >= 1"),
    ({"messages": [user("a")], "n": 17}, "n must be between 1 and 16"),
    ({"messages": [user([])]}, "content is an empty list"),
    ({"messages": [user([{"type": "image_url", "image_url": {"url": "a.png", "detail": "ultra"}}])]},
     "detail must be 'low', 'high' or 'auto'"),
    ({"messages": [user("a")], "presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\]"),
    ({"messages": [user("a")], "frequency_penalty": -3}, r"frequency_penalty must be in \[-2, 2\]"),
    ({"messages": [user("a")], "logit_bias": {"x": 1}}, "'x' is not a token id"),
    ({"messages": [user("a")], "logit_bias": {"5": 101}}, r"logit_bias\[5\] must be in \[-100, 100\]"),
    ({"messages": [user("a")], "logit_bias": [5]}, "logit_bias must be an object"),
    ({"messages": [user("a")], "top_logprobs": 21, "logprobs": True}, r"top_logprobs must be in \[0, 20\]"),
    ({"messages": [user("a")], "response_format": {"type": "xml"}}, "response_format.type must be"),
    ({"messages": [user("a")], "response_format": {"type": "json_schema"}}, "must be an object with a `schema`"),
    ({"messages": [user("a")], "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {}, "strict": "yes"}}}, "strict must be a boolean"),
    ({"messages": [user("a")], "response_format": {"type": "json_schema", "json_schema": {
        "schema": {}, "format": 1}}}, "unknown field 'format'"),
    ({"messages": [user("a")], "response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "not both"),
    ({"messages": [user("a")], "structured_outputs": {"grammar": "root ::= x"}}, "exactly one of 'regex'"),
    ({"messages": [user("a")], "structured_outputs": {"choice": []}}, "list of choices is empty"),
    ({"messages": [user("a")], "structured_outputs": {"choice": ["a", 1]}}, "must be a list of strings"),
    ({"messages": [user("a")], "structured_outputs": {"regex": ""}}, "pattern is empty"),
    ({"messages": [user("a")], "frobnicate": 1}, "unknown field 'frobnicate'"),
    ({"messages": [user("a")], "store": True}, "store is not supported"),
    ({"messages": [user("a")], "service_tier": "flex"}, "one tier"),
    ({"messages": [user("a")], "modalities": ["text", "audio"]}, "only \\[\"text\"\\] output"),
    ({"messages": [user("a")], "stream_options": {"include_obfuscation": True}}, "include_obfuscation"),
    ({"messages": [{"role": "user", "content": "a", "name": "bob"}]}, r"messages\[0\].name is not supported"),
    ({"messages": [user("a"), {"role": "assistant", "content": "b", "tool_calls": []}, user("c")]},
     r"messages\[1\].tool_calls is not supported"),
    ({"messages": [user("a")], "top_logprobs": 2}, "requires logprobs"),
    ({"messages": [user("a")], "temperature": "hot"}, "temperature has the wrong type"),
    ({"messages": [user("a")], "multi_image_mode": "mosaic"}, "multi_image_mode"),
    ({"messages": [user([{"type": "video", "video": {"num_segments": 4}}])]}, "needs a url"),
])
def test_parse_rejects(body, message):
    with pytest.raises(InvalidArgumentError, match=message):
        request = parse_request(body)[0]
        request.sampling.validate()  # what the orchestrator checks next, before any media work


@pytest.mark.parametrize("name", [name for name, rule in FIELDS.items() if rule is not True])
def test_every_unsupported_field_is_refused_naming_it(name):
    with pytest.raises(InvalidArgumentError, match=f"^{name} is not supported: {re.escape(FIELDS[name])}$"):
        parse_request({"messages": [user("a")], name: [{"type": "function"}]})
    parse_request({"messages": [user("a")], name: None})  # null is what the openai client's "not given" may send


def test_every_openai_request_field_has_a_rule():
    """The Chat Completions request fields of the installed openai client's own types all have an entry."""
    from openai.types.chat import completion_create_params

    fields = set(completion_create_params.CompletionCreateParamsBase.__annotations__)
    assert fields - set(FIELDS) == set(), "a field of the Chat Completions API has no rule here"


def test_fields_that_ask_for_nothing_are_accepted():
    request, *_ = parse_request({"messages": [user("a")], "store": False, "service_tier": "auto",
                                 "modalities": ["text"], "parallel_tool_calls": True, "safety_identifier": "u1",
                                 "stream_options": {"include_usage": True, "include_obfuscation": False}})
    assert request.user == "u1"


def test_parse_sampling_extensions_and_structured_outputs():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    request, *_ = parse_request({
        "messages": [user([{"type": "image_url", "image_url": {"url": "a.png", "detail": "low"}},
                           {"type": "image_url", "image_url": {"url": "b.png"}}])],
        "n": 3, "seed": 7, "presence_penalty": 0.5, "frequency_penalty": -0.25, "logit_bias": {"42": -100, "7": 5},
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}})
    s = request.sampling
    assert (s.n, s.presence_penalty, s.frequency_penalty, s.logit_bias) == (3, 0.5, -0.25, ((7, 5.0), (42, -100.0)))
    assert s.constraint == Constraint(ConstraintKind.JSON_SCHEMA, schema=json.dumps(schema), strict=True)
    assert [p.image.detail for p in request.content] == [ImageDetail.LOW, ImageDetail.AUTO]
    for body, expected in [
        ({"response_format": {"type": "json_object"}}, Constraint(ConstraintKind.JSON_OBJECT)),
        ({"response_format": {"type": "text"}}, None),
        ({"structured_outputs": {"regex": "[0-9]+"}}, Constraint(ConstraintKind.REGEX, pattern="[0-9]+")),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, Constraint(ConstraintKind.CHOICE, choices=("yes", "no"))),
    ]:
        assert parse_request({"messages": [user("a")], **body})[0].sampling.constraint == expected


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
