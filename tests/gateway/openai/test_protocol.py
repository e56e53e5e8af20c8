"""The OpenAI request models: parsing into the domain request, every field's rule, and the API's exact refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gateway.chat_request import ImageDetail, MultiImageMode
from gateway.openai.protocol import ChatCompletionRequest, parse
from services.contract.constraint import Constraint, ConstraintKind
from services.contract.errors import InvalidArgumentError

README = Path(__file__).resolve().parents[3] / "README.md"


def user(content) -> dict:
    return {"role": "user", "content": content}


def test_parse_conversation_into_turns():
    body = parse({"messages": [{"role": "system", "content": "Be brief."},
                               user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                     {"type": "text", "text": "What is it?"}]),
                               {"role": "assistant", "content": "A cat."},
                               user("Colour?"), user([{"type": "image_url", "image_url": {"url": "pics/b.png"}}])],
                  "max_tokens": 7, "temperature": 0, "stop": "END", "seed": 3, "logprobs": True, "top_logprobs": 2,
                  "top_k": 5, "max_num": 4, "multi_image_mode": "combined", "session_id": "s1"})
    assert (bool(body.stream), body.include_usage, body.reported_top_logprobs) == (False, False, 2)
    request = body.chat_request()
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
    body = parse({"messages": [user("hi")]})
    request = body.chat_request()
    assert request.sampling.temperature == 1.0 and request.sampling.top_logprobs == 0
    assert body.reported_top_logprobs is None


def test_parse_video_parts_and_roles():
    body = parse({"messages": [
        {"role": "developer", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]},
        {"role": "system", "content": "C"},
        user([{"type": "video", "video": {"url": "https://x/v.mp4", "num_segments": 4, "bound": [0, 1.5]}},
              {"type": "video", "video": {"path": "clips/a.mp4", "max_num": 2}},
              {"type": "video", "video": {"url": "clips/b.mp4"}}]),
        {"role": "assistant", "content": None}, user("again")],
        "max_completion_tokens": 9, "max_tokens": 3, "safety_identifier": "u2", "model": "adapter-a"})
    request = body.chat_request(request_id="r-1")
    assert request.system_message == "AB\nC"
    videos = [p.video for p in request.history[0].user]
    assert (videos[0].url, videos[0].path, videos[0].num_segments, videos[0].bound) == ("https://x/v.mp4", None, 4,
                                                                                        (0.0, 1.5))
    assert (videos[1].path, videos[1].max_num, videos[1].num_segments) == ("clips/a.mp4", 2, 8)
    assert (videos[2].url, videos[2].path) == (None, "clips/b.mp4")  # a `url` that is not one names a file
    assert request.history[0].assistant_text == ""
    assert (request.sampling.max_new_tokens, request.user, request.model, request.request_id) == (
        9, "u2", "adapter-a", "r-1")


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
        request = parse(body).chat_request()
        request.sampling.validate()  # what the orchestrator checks next, before any media work


def video(spec) -> dict:
    return {"messages": [user([{"type": "video", "video": spec}])]}


def field(name: str, value) -> dict:
    return {"messages": [user("a")], name: value}


# Each rule of the request models and the API's whole message for it, written out.
EXACT = [
    ([1, 2], "the body must be a JSON object"),
    ({"messages": None}, "messages must be a non-empty list"),
    ({"messages": {"role": "user"}}, "messages has the wrong type (dict)"),
    ({"messages": [5]}, "messages[0]: unsupported role None (system, user, assistant)"),
    ({"messages": [{"role": "robot", "content": "hi"}]},
     "messages[0]: unsupported role 'robot' (system, user, assistant)"),
    ({"messages": [{"role": "tool", "tool_call_id": "c1", "content": "x"}]},
     "messages[0].tool_call_id is not supported: tool calling is not supported"),
    ({"messages": [{"role": "user", "content": "a", "refusal": "no"}]},
     "messages[0].refusal is not supported: assistant refusals cannot be replayed"),
    ({"messages": [user(None)]}, "messages[0].content must be a string or a list of parts"),
    ({"messages": [{"role": "system", "content": 5}, user("a")]},
     "messages[0].content must be a string or a list of parts"),
    ({"messages": [user([])]}, "messages[0].content is an empty list"),
    ({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": "a.png"}]}, user("a")]},
     "messages[0]: only text is allowed here"),
    ({"messages": [user("a"), {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"},
                   user("d")]}, "messages[2]: an assistant message must follow a user message"),
    ({"messages": [user("a"), {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"}]},
     "the last message must be a user message"),
    ({"messages": [user(["hi"])]}, "messages[0].content[0]: unsupported part type None (text, image_url, video)"),
    ({"messages": [user([{"type": "text", "text": 5}])]},
     "messages[0].content[0]: unsupported part type 'text' (text, image_url, video)"),
    ({"messages": [user([{"type": "text", "text": "a"}, {"type": "input_audio"}])]},
     "messages[0].content[1]: unsupported part type 'input_audio' (text, image_url, video)"),
    ({"messages": [user([{"type": "image_url"}])]}, "messages[0].content[0].image_url.url must be a non-empty string"),
    ({"messages": [user([{"type": "image_url", "image_url": {"url": ""}}])]},
     "messages[0].content[0].image_url.url must be a non-empty string"),
    ({"messages": [user([{"type": "image_url", "image_url": {"url": "a.png", "detail": 3}}])]},
     "messages[0].content[0].image_url.detail must be 'low', 'high' or 'auto', got 3"),
    (video("a.mp4"), "messages[0].content[0].video must be an object"),
    (video({"path": 5}), "messages[0].content[0].video needs a url (a data: or http(s) URL) or a path"),
    (video({"path": "a.mp4", "num_segments": 2.0}), "messages[0].content[0].video.num_segments must be an integer"),
    (video({"path": "a.mp4", "max_num": True}), "messages[0].content[0].video.max_num must be an integer"),
    (video({"path": "a.mp4", "bound": [1, 2, 3]}),
     "messages[0].content[0].video.bound must be [start_seconds, end_seconds]"),
    (video({"path": "a.mp4", "bound": [0, "1"]}), "messages[0].content[0].video.bound must be a number"),
    (video({"path": "a.mp4", "bound": [0, 10**400]}), "messages[0].content[0].video.bound is out of range"),
    (field("frobnicate", 1), "unknown field 'frobnicate'; this API's fields are listed in the README"),
    (field("store", True), "store is not supported: completions are not stored (omit it or send false)"),
    (field("service_tier", "flex"), "service_tier: this server has one tier ('auto' or 'default')"),
    (field("modalities", ["audio"]), 'modalities: only ["text"] output is supported'),
    (field("stream_options", [1]), "stream_options has the wrong type (list)"),
    (field("stream_options", {"chunk_size": 3}), "stream_options.chunk_size is not supported"),
    (field("stream_options", {"include_obfuscation": 1}), "stream_options.include_obfuscation is not supported"),
    (field("stop", 5), "stop must be a string or a list of strings"),
    (field("stop", ["a", None]), "stop must be a string or a list of strings"),
    (field("logprobs", 1), "logprobs has the wrong type (int)"),
    (field("top_logprobs", True), "top_logprobs must be a number"),
    (field("top_logprobs", 2), "top_logprobs requires logprobs = true"),
    (field("multi_image_mode", 2), "multi_image_mode has the wrong type (int)"),
    (field("multi_image_mode", "mosaic"), "multi_image_mode must be 'separate' or 'combined'"),
    (field("max_completion_tokens", "9"), "max_completion_tokens has the wrong type (str)"),
    (field("max_tokens", 5.0), "max_tokens has the wrong type (float)"),
    (field("temperature", True), "temperature must be a number"),
    (field("temperature", "hot"), "temperature has the wrong type (str)"),
    (field("temperature", 10**400), "temperature is out of range"),
    (field("top_p", [1]), "top_p has the wrong type (list)"),
    (field("top_k", 1.5), "top_k has the wrong type (float)"),
    (field("repetition_penalty", False), "repetition_penalty must be a number"),
    (field("seed", "7"), "seed has the wrong type (str)"),
    (field("presence_penalty", {}), "presence_penalty has the wrong type (dict)"),
    (field("frequency_penalty", -(10**400)), "frequency_penalty is out of range"),
    (field("logit_bias", [5]), "logit_bias must be an object mapping token ids to biases"),
    (field("logit_bias", {"x": 1}), "logit_bias: 'x' is not a token id"),
    (field("logit_bias", {"5": "1"}), "logit_bias[5] must be a number"),
    (field("logit_bias", {"5": 10**400}), "logit_bias[5] is out of range"),
    (field("n", True), "n must be a number"),
    (field("n", 0), "n must be >= 1, got 0"),
    (field("response_format", "json"), "response_format has the wrong type (str)"),
    (field("response_format", {"type": "xml"}),
     "response_format.type must be 'text', 'json_object' or 'json_schema', got 'xml'"),
    (field("response_format", {"type": "json_schema", "json_schema": {"schema": "{}"}}),
     "response_format.json_schema must be an object with a `schema` object"),
    (field("response_format", {"type": "json_schema", "json_schema": {"schema": {}, "x": 1, "format": 2}}),
     "response_format.json_schema: unknown field 'format'"),
    (field("response_format", {"type": "json_schema", "json_schema": {"schema": True, "strict": 1}}),
     "response_format.json_schema.strict must be a boolean"),
    ({**field("response_format", {"type": "json_schema", "json_schema": {"schema": {}}}),
      "structured_outputs": {"choice": ["a"]}}, "send either response_format or structured_outputs, not both"),
    (field("structured_outputs", "a|b"), "structured_outputs has the wrong type (str)"),
    (field("structured_outputs", {"regex": "a", "choice": ["a"]}),
     "structured_outputs must have exactly one of 'regex' (a string) or 'choice' (a list of strings)"),
    (field("structured_outputs", {"regex": None}), "structured_outputs.regex must be a string"),
    (field("structured_outputs", {"choice": "a"}), "structured_outputs.choice must be a list of strings"),
    (field("session_id", 5), "session_id has the wrong type (int)"),
    (field("max_num", "6"), "max_num has the wrong type (str)"),
    (field("user", True), "user has the wrong type (bool)"),
    (field("safety_identifier", 1), "safety_identifier has the wrong type (int)"),
    (field("model", ["a"]), "model has the wrong type (list)"),
    (field("stream", "yes"), "stream has the wrong type (str)"),
    # Each field is checked whether or not another one wins over it.
    ({**field("max_tokens", "9"), "max_completion_tokens": 5}, "max_tokens has the wrong type (str)"),
    ({**field("safety_identifier", 5), "user": "u1"}, "safety_identifier has the wrong type (int)"),
    # With several problems: a field this API does not take first, in the body's order; then the fields in order.
    ({"messages": [], "temperature": "hot", "frobnicate": 1, "tools": [1]},
     "unknown field 'frobnicate'; this API's fields are listed in the README"),
    ({"tools": [1], "frobnicate": 1, "messages": []}, "tools is not supported: tool calling is not supported"),
    ({"stop": 5, "messages": []}, "messages must be a non-empty list"),
    ({"messages": [user("a"), {"role": "system", "content": "b"}], "stop": 5},
     "stop must be a string or a list of strings"),
]


@pytest.mark.parametrize(("body", "message"), EXACT, ids=[f"{i}-{m[:40]}" for i, (_, m) in enumerate(EXACT)])
def test_each_rule_is_refused_with_its_message(body, message):
    with pytest.raises(InvalidArgumentError) as info:
        parse(body)
    assert str(info.value) == message


# The reason each refused field is refused with.
REFUSED = {
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "InternVL 2.5 is not a reasoning model",
    "verbosity": "verbosity is not supported",
    "web_search_options": "web search is not supported",
    "metadata": "stored completions are not supported (metadata needs store)",
    "prompt_cache_key": "the prefix cache is keyed by content; a prompt_cache_key has no effect here",
    "prompt_cache_retention": "the prefix cache is keyed by content; its retention is the server's",
    "prompt_cache_options": "the prefix cache is keyed by content; its options are the server's",
    "moderation": "moderation is not part of this server",
}


def test_the_refused_fields_are_these():
    assert ChatCompletionRequest.refused() == REFUSED


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_every_unsupported_field_is_refused_naming_it(name):
    with pytest.raises(InvalidArgumentError, match=f"^{name} is not supported: {re.escape(REFUSED[name])}$"):
        parse({"messages": [user("a")], name: [{"type": "function"}]})
    parse({"messages": [user("a")], name: None})  # null is what the openai client's "not given" may send


def test_every_openai_request_field_has_a_rule():
    """The Chat Completions request fields of the installed openai client's own types all have an entry."""
    from openai.types.chat import completion_create_params

    fields = set(completion_create_params.CompletionCreateParamsBase.__annotations__)
    assert fields - set(ChatCompletionRequest.model_fields) == set(), "a field of the Chat Completions API has no rule"


def _readme_field_table() -> list[tuple[set[str], str]]:
    """The rows of the README's table of request fields: (the fields a row names, what it says happens)."""
    section = README.read_text().split("### OpenAI-compatible HTTP", 1)[1]
    rows = section.split("| field | what happens |\n|---|---|\n", 1)[1].split("\n\n", 1)[0].splitlines()
    table = []
    for row in rows:
        first, second = (cell.strip() for cell in row.strip("|").split(" | ", 1))
        # Extensions are listed in the second column; parenthesised text says more about a field.
        names = re.sub(r"\([^)]*\)", "", second if first == "extensions" else first)
        table.append((set(re.findall(r"`([a-z_]+)", names)), second))
    return table


def test_the_readme_table_names_every_declared_field():
    table = _readme_field_table()
    assert set().union(*(names for names, _ in table)) == set(ChatCompletionRequest.model_fields)
    assert [names for names, what in table if what == "refused with the reason"] == [set(REFUSED)]


def test_fields_that_ask_for_nothing_are_accepted():
    request = parse({"messages": [user("a")], "store": False, "service_tier": "auto", "modalities": ["text"],
                     "parallel_tool_calls": True, "safety_identifier": "u1",
                     "stream_options": {"include_usage": True, "include_obfuscation": False}}).chat_request()
    assert request.user == "u1"
    parse({"messages": [user("a")], "service_tier": "default", "store": None, "modalities": None})


def test_parse_sampling_extensions_and_structured_outputs():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    request = parse({
        "messages": [user([{"type": "image_url", "image_url": {"url": "a.png", "detail": "low"}},
                           {"type": "image_url", "image_url": {"url": "b.png"}}])],
        "n": 3, "seed": 7, "presence_penalty": 0.5, "frequency_penalty": -0.25, "logit_bias": {"42": -100, "7": 5},
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}},
    }).chat_request()
    s = request.sampling
    assert (s.n, s.presence_penalty, s.frequency_penalty, s.logit_bias) == (3, 0.5, -0.25, ((7, 5.0), (42, -100.0)))
    assert s.constraint == Constraint(ConstraintKind.JSON_SCHEMA, schema=json.dumps(schema), strict=True)
    assert [p.image.detail for p in request.content] == [ImageDetail.LOW, ImageDetail.AUTO]
    for body, expected in [
        ({"response_format": {"type": "json_object"}}, Constraint(ConstraintKind.JSON_OBJECT)),
        ({"response_format": {"type": "text"}}, None),
        ({"structured_outputs": {"regex": "[0-9]+"}}, Constraint(ConstraintKind.REGEX, pattern="[0-9]+")),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, Constraint(ConstraintKind.CHOICE, choices=("yes", "no"))),
        ({"response_format": {"type": "text"}, "structured_outputs": {"regex": "a"}},
         Constraint(ConstraintKind.REGEX, pattern="a")),
    ]:
        assert parse({"messages": [user("a")], **body}).chat_request().sampling.constraint == expected
