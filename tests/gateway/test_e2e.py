"""End to end: Redis, the vision service, the LLM service and the gateway as four real processes on a tiny checkpoint
(float32), started by `internvl-serve up` (what `make run` runs), against the single-process reference path
(`InternVLChat`, the original `chat()`).

Greedy answers through the gateway must equal the reference token for token for one image, two images (explicit and
automatic placeholders), a video the test writes with PyAV, a text-only question, and the second round of a session
(which must reuse the cached tiles and prompt prefix and encode nothing). The OpenAI-compatible API is checked with
the official `openai` client, `internvl-chat` as a process, the gateway's /metrics counters are checked to move, and
Ctrl-C must stop every process.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time

import grpc
import pytest
import torch
from helpers.chat import Answer, chat, image_part, text_part
from helpers.media import reference_frames, write_video
from internvl.gateway.v1 import gateway_pb2 as G
from procs import REPO
from stack import up_stack

from services.contract import template
from services.model.chat import GenerationParams, InternVLChat
from services.vision.preprocess import load_image
from tools.launcher import metric

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MAX_NEW = 6


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def stack(checkpoint, media_root, tmp_path_factory):
    """The whole stack as `make run` starts it: `internvl-serve up` runs redis-server, vision, llm and gateway as
    separate processes and prints a banner once all report SERVING; Ctrl-C (SIGINT) must then stop them all."""
    with up_stack(checkpoint, tmp_path_factory.mktemp("up-logs"), "--media-root", str(media_root)) as running:
        assert f"internvl-chat --target localhost:{running.port}" in running.banner
        yield running


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def stub(stack):
    return stack.stub


@pytest.fixture(scope="module")
def reference(checkpoint):
    return InternVLChat.load(str(checkpoint), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def images(golden_dir):
    return {name: (golden_dir / f"{name}.png").read_bytes()
            for name in ("small_120x90", "landscape_1000x700", "portrait_333x1200")}


# ------------------------------------------------------------------------------------------------------ helpers


def ask(stub, content, **fields) -> Answer:
    """One greedy Chat of MAX_NEW tokens."""
    return chat(stub, content, max_new_tokens=MAX_NEW, timeout=120, **fields)


class Expected(list):
    """Greedy token ids of the reference path, and the length of the prompt it built."""

    prompt_tokens: int


def expected(reference: InternVLChat, question: str, tiles: list[torch.Tensor], history=None) -> Expected:
    """What the original `chat()` generates greedily (its prompt, its own placeholder rules)."""
    pixels = torch.cat(tiles) if tiles else None
    _, prompt = reference.build_prompt(question, history, [t.shape[0] for t in tiles])
    out = Expected(reference.generate_ids(prompt, pixels, GenerationParams(max_new_tokens=MAX_NEW)))
    out.prompt_tokens = len(reference.tokenizer(prompt).input_ids)
    return out


def check(got: tuple, want: Expected) -> None:
    """Same tokens, and the same prompt length (so the same placeholders and template were used)."""
    ids, finish = got.token_ids, got.finish
    assert ids == want
    assert finish.usage.prompt_tokens == want.prompt_tokens
    assert finish.usage.completion_tokens == len(ids)


# -------------------------------------------------------------------------------------------------------- tests


def test_one_image(stub, reference, images):
    data = images["landscape_1000x700"]
    got = ask(stub, [image_part(data), text_part("Describe the image.")], max_num=4)
    tiles = load_image(data, max_num=4)
    check(got, expected(reference, "Describe the image.", [tiles]))
    finish = got.finish
    assert list(finish.usage.image_tiles) == [tiles.shape[0]] == [5]
    assert finish.usage.encoded_tiles + finish.usage.reused_tiles == 5


def test_two_images_explicit_placeholders(stub, reference, images):
    a, b = images["small_120x90"], images["portrait_333x1200"]
    question = "Image-1: <image>\nImage-2: <image>\nWhat differs between them?"
    got = ask(stub, [text_part(question), image_part(a), image_part(b)], max_num=3)
    tiles = [load_image(a, max_num=3), load_image(b, max_num=3)]
    check(got, expected(reference, question, tiles))
    assert list(got.finish.usage.image_tiles) == [t.shape[0] for t in tiles]


def test_two_images_automatic_placeholders(stub, reference, images):
    a, b = images["portrait_333x1200"], images["small_120x90"]
    got = ask(stub, [image_part(a), image_part(b), text_part("Describe both.")], max_num=2)
    tiles = [load_image(a, max_num=2), load_image(b, max_num=2)]
    check(got, expected(reference, template.multi_image_prefix(2) + "Describe both.", tiles))
    assert list(got.finish.usage.image_tiles) == [t.shape[0] for t in tiles]


def test_video(stub, reference):
    data = write_video(frames=16, fps=8, size=(96, 64))
    video = G.VideoInput(data=data, num_segments=4)
    got = ask(stub, [G.ContentPart(video=video), text_part("What happens in the video?")])
    frames = reference_frames(data, 4)
    check(got, expected(reference, template.video_prefix(4) + "What happens in the video?", frames))
    assert list(got.finish.usage.image_tiles) == [1, 1, 1, 1]


def test_text_only(stub, reference):
    got = ask(stub, [text_part("Hello, who are you?")])
    check(got, expected(reference, "Hello, who are you?", []))
    assert list(got.finish.usage.image_tiles) == [] and got.finish.usage.encoded_tiles == 0


def test_session_second_round_reuses_everything(stub, reference, images, stack):
    data = images["portrait_333x1200"]
    tiles = load_image(data, max_num=6)
    got1 = ask(stub, [image_part(data), text_part("What is in the picture?")], max_num=6)
    check(got1, expected(reference, "What is in the picture?", [tiles]))
    ids1, first = got1.token_ids, got1.finish

    vision_before = stack.metrics("vision-0")
    got2 = ask(stub, [text_part("Tell me more.")], session_id=first.session_id)
    vision_after = stack.metrics("vision-0")
    second = got2.finish

    # The original's history: the first question as stored (with its `<image>\n`), the decoded, cleaned answer.
    answer1 = template.clean_response(reference.tokenizer.decode(ids1, skip_special_tokens=True))
    history = [("<image>\nWhat is in the picture?", answer1)]
    check(got2, expected(reference, "Tell me more.", [tiles], history))
    assert second.session_id == first.session_id
    assert second.usage.encoded_tiles == 0 and second.usage.reused_tiles == tiles.shape[0]
    assert list(second.usage.image_tiles) == [tiles.shape[0]]
    assert second.usage.cached_prompt_tokens > tiles.shape[0] * 256
    for name in ("internvl_vision_tiles_encoded_total", "internvl_vision_cache_misses_total"):
        assert metric(vision_after, name) == metric(vision_before, name), name


def test_unknown_session_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as info:
        ask(stub, [text_part("Hi")], session_id="does-not-exist")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_openai_client(stack, reference, images):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.http_port}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [reference.checkpoint.name]

    data = images["small_120x90"]
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": url}}]}]
    want = template.clean_response(reference.tokenizer.decode(
        expected(reference, "What is this?", [load_image(data)]), skip_special_tokens=True))

    reply = client.chat.completions.create(model=stack.model, messages=messages, max_tokens=MAX_NEW, temperature=0)
    assert reply.choices[0].message.content.strip() == want
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > 256

    stream = client.chat.completions.create(model=stack.model, messages=messages, max_tokens=MAX_NEW, temperature=0,
                                            stream=True, stream_options={"include_usage": True}, logprobs=True,
                                            top_logprobs=2)
    content, logprobs, usage, reasons = [], [], None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            content.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
            if choice.logprobs is not None:
                logprobs += choice.logprobs.content
    assert "".join(content).strip() == want
    assert reasons[-1] in ("stop", "length")
    assert usage is not None and usage.completion_tokens == len(logprobs)
    assert all(len(lp.top_logprobs) == 2 and lp.logprob <= 0 for lp in logprobs)

    with pytest.raises(openai.BadRequestError, match="remote URLs are not fetched"):
        client.chat.completions.create(model=stack.model, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])


WEATHER = {"type": "object", "properties": {
    "sky": {"enum": ["clear", "cloudy", "rain"]},
    "degrees": {"type": "integer", "minimum": -50, "maximum": 50},
    "windy": {"type": "boolean"}}, "required": ["sky", "degrees", "windy"]}


def test_openai_structured_outputs(stack, reference, images):
    """Random weights make free text garbage: only the grammar can make these answers valid."""
    openai = pytest.importorskip("openai")
    jsonschema = pytest.importorskip("jsonschema")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.http_port}/v1", api_key="unused", max_retries=0)
    url = "data:image/png;base64," + base64.b64encode(images["small_120x90"]).decode()
    prompts = {"text": [{"role": "user", "content": "Report the weather."}],
               "image": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "Describe the weather here."}]}]}
    schema = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}
    for messages in prompts.values():
        reply = client.chat.completions.create(model=stack.model, messages=messages, max_tokens=80, temperature=0,
                                               response_format=schema)
        assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
        jsonschema.validate(json.loads(reply.choices[0].message.content), WEATHER)
        stream = client.chat.completions.create(model=stack.model, messages=messages, max_tokens=80, temperature=0.9,
                                                seed=5, response_format=schema, stream=True)
        text_ = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        jsonschema.validate(json.loads(text_), WEATHER)
    # The next round of the (image) session, constrained as well.
    reply = client.chat.completions.create(model=stack.model, messages=[{"role": "user", "content": "And tomorrow?"}],
                                           max_tokens=80, temperature=0, response_format=schema,
                                           extra_body={"session_id": reply.model_extra["session_id"]})
    assert reply.usage.prompt_tokens_details.cached_tokens > 256  # the first round's prefix, image included
    jsonschema.validate(json.loads(reply.choices[0].message.content), WEATHER)

    # Any object: a random model writes one endless key, so logit_bias favours closing a string most, then closing
    # the object; the grammar alone decides where they may go ("}" inside a string is text, not the end).
    ids = reference.tokenizer.convert_tokens_to_ids
    closing = {str(ids('"')): 100, str(ids("}")): 50}
    reply = client.chat.completions.create(model=stack.model, messages=prompts["text"], max_tokens=60, temperature=0,
                                           response_format={"type": "json_object"}, logit_bias=closing)
    assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    choices = ["sunny", "rainy", "it is \"foggy\""]
    reply = client.chat.completions.create(model=stack.model, messages=prompts["image"], max_tokens=20,
                                           temperature=1.0, extra_body={"structured_outputs": {"choice": choices}})
    assert reply.choices[0].message.content in choices

    with pytest.raises(openai.BadRequestError, match="json_schema: .*nonsense"):
        client.chat.completions.create(model=stack.model, messages=prompts["text"], max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
    with pytest.raises(openai.BadRequestError, match="tools is not supported: tool calling is not supported"):
        client.chat.completions.create(model=stack.model, messages=prompts["text"], max_tokens=4, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])


def test_openai_n_answers_are_prefilled_once_and_detail_low_is_one_tile(stack, images):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.http_port}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Write a line about n answers to one prompt, " + "again " * 20}]
    before = stack.metrics("llm")
    reply = client.chat.completions.create(model=stack.model, messages=messages, n=3, seed=41, temperature=1.0,
                                           max_tokens=8, logprobs=True)
    fed = metric(stack.metrics("llm"), "internvl_llm_prefill_tokens_total") - metric(
        before, "internvl_llm_prefill_tokens_total")
    assert [c.index for c in reply.choices] == [0, 1, 2]
    # Once for the three answers: the prompt's tokens less those the prefix cache held (earlier tests' system prompt).
    cached = reply.usage.prompt_tokens_details.cached_tokens
    assert cached < reply.usage.prompt_tokens - 20
    assert fed == reply.usage.prompt_tokens - cached, "the prompt was not prefilled exactly once for the three answers"
    singles = [client.chat.completions.create(model=stack.model, messages=messages, seed=seed, temperature=1.0,
                                              max_tokens=8).choices[0].message.content for seed in (41, 42, 43)]
    assert [c.message.content for c in reply.choices] == singles
    assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices)

    url = "data:image/png;base64," + base64.b64encode(images["landscape_1000x700"]).decode()
    tiles = {}
    for detail in ("low", "high"):
        reply = client.chat.completions.create(model=stack.model, max_tokens=2, temperature=0, messages=[{
            "role": "user", "content": [{"type": "image_url", "image_url": {"url": url, "detail": detail}},
                                        {"type": "text", "text": "What?"}]}], extra_body={"max_num": 6})
        tiles[detail] = reply.usage.model_extra["internvl"]["image_tiles"]
    assert tiles["low"] == [1] and tiles["high"][0] > 1


def test_media_path_and_metrics_move(stack, stub, images, media_root):
    (media_root / "cat.png").write_bytes(images["small_120x90"])
    before = stack.metrics()
    finish = ask(stub, [image_part(path="cat.png"), text_part("And this?")], max_num=1).finish
    with pytest.raises(grpc.RpcError) as info:
        ask(stub, [image_part(path="/etc/hostname"), text_part("?")])
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # A call is counted when the server's stream has closed, a moment after the client has its last message.
    deadline = time.monotonic() + 10
    while True:
        after = stack.metrics()
        if metric(after, "internvl_gateway_request_seconds_count", method="Chat") - metric(
                before, "internvl_gateway_request_seconds_count", method="Chat") >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    assert list(finish.usage.image_tiles) == [1]

    def grew(name: str, **labels) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("internvl_gateway_requests_total", method="Chat", code="OK") == 1
    assert grew("internvl_gateway_requests_total", method="Chat", code="PERMISSION_DENIED") == 1
    assert grew("internvl_gateway_generated_tokens_total", method="Chat") == finish.usage.completion_tokens
    assert grew("internvl_gateway_time_to_first_token_seconds_count", method="Chat") == 1
    assert grew("internvl_gateway_request_seconds_count", method="Chat") == 2
    tiles = grew("internvl_gateway_tiles_encoded_total") + grew("internvl_gateway_tiles_reused_total")
    assert tiles == 1
    assert grew("internvl_gateway_embedding_bytes_total", path="reference") > 0
    assert metric(after, "internvl_gateway_in_flight_requests", method="Chat") == 0
    # Over the whole module: tiles were both encoded (first sight) and reused (sessions, repeated images).
    assert metric(after, "internvl_gateway_tiles_encoded_total") > 0
    assert metric(after, "internvl_gateway_tiles_reused_total") > 0


def test_internvl_chat_cli(stack, golden_dir):
    """The command the banner suggests, as a separate process."""
    chat = subprocess.run(
        [sys.executable, "-m", "gateway.chat_cli", "--target", stack.address, "--image",
         str(golden_dir / "small_120x90.png"), "--max-tokens", "3", "--top-logprobs", "2", "--json",
         "Describe the image."],
        check=False, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=60)
    assert chat.returncode == 0, chat.stderr
    last = json.loads(chat.stdout.splitlines()[-1])
    assert len(last["token_ids"]) == last["usage"]["completion_tokens"] == len(last["logprobs"]) >= 1
    assert all(len(lp["top"]) == 2 for lp in last["logprobs"])
    assert last["usage"]["image_tiles"] == [13] and last["finish_reason"] in ("stop", "length")
    assert last["session_id"]
