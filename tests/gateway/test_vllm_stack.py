"""The whole stack on the vLLM engine: `internvl-serve up --engine vllm` (Redis, vision, the LLM service with vLLM's
AsyncLLM and its engine processes, the gateway) on make-tiny's `small` shape (LLM head size 32, the smallest vLLM's
CPU attention runs), for both language-model families: Qwen2, and InternLM2 with the published sizes' tokenizer path
(a sentencepiece model and the checkpoint's own tokenizer class; its other code files are tripwires).

Greedy answers through the gateway (gRPC and the OpenAI API) must equal the reference path (`InternVLChat`, the
original `chat()`) token for token, and transformers' own `InternVLForConditionalGeneration` too, whose log-softmax
the top-5 log-probabilities must match within helpers.native.LOGPROB_ATOL (float32): text, one image, two images of
different tile counts, combined mode, a video, a session's two turns (the second reporting the first's prefix from
vLLM's cache); n answers equal single requests with seed + i; structured outputs (JSON object, JSON schema, regex,
choice) valid and the same through both APIs; a LoRA adapter served beside the base equals PEFT's own LoRA layers.
What the vLLM engine refuses is refused through the stack with INVALID_ARGUMENT (HTTP 400) and the engine's message.

One stack per family, shared by the module's tests (an engine starts in tens of seconds on 2 cores).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import jsonschema
import openai
import pytest
import torch
from helpers.chat import Answer, chat, chat_answers, image_part, text_part
from helpers.media import reference_frames, write_video
from helpers.native import LOGPROB_ATOL, load_native, native_greedy, small_checkpoint, top_logprob_gaps
from internvl.common.v1 import common_pb2 as C
from internvl.gateway.v1 import gateway_pb2 as G
from lora_reference import INTERNLM2_TARGETS, QWEN2_TARGETS, OriginalInternVL, unwrap, write_swift_adapter
from stack import UpStack, up_stack

from services.contract import template
from services.model.chat import GenerationParams, InternVLChat
from services.vision.preprocess import load_image

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

MAX_NEW = 8
TOP = 5
# vLLM's KV block on a CPU: the unit its prefix cache hits in.
BLOCK = 128
# The LLM service on vLLM for these small stacks: a KV pool of 32 MiB (running sequences and prefix cache share it:
# thousands of tokens of the small shape) instead of 80% of the free memory, and a 4096-token context.
VLLM_FLAGS = ("--engine", "vllm", "--kv-budget-mb", "16", "--kv-cache-budget-mb", "16", "--max-context-tokens", "4096")
# The LoRA adapter each stack serves beside the base (language layers only: what vLLM's LoRA computes).
ADAPTER = "pictures"
ADAPTER_TARGETS = {"qwen2": QWEN2_TARGETS, "internlm2": INTERNLM2_TARGETS}


@dataclass
class Family:
    """One family's stack and its references."""

    name: str
    stack: UpStack
    chat: InternVLChat  # the reference path (and its tokenizer)
    native: torch.nn.Module  # transformers' InternVLForConditionalGeneration, for the logits
    adapted: OriginalInternVL  # the original module tree with PEFT's LoRA layers of the served adapter ADAPTER

    @property
    def stub(self):
        return self.stack.stub

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.stack.http_port}/v1", api_key="unused",
                             max_retries=0)


@pytest.fixture(scope="module", params=["qwen2", "internlm2"])
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"vllm-stack-{request.param}")
    path, built = small_checkpoint(request.param, root)
    logs = root / "logs"
    logs.mkdir()
    adapter_dir, adapted = write_swift_adapter(OriginalInternVL(path), root / "adapter",
                                               target_modules=ADAPTER_TARGETS[request.param], r=8, lora_alpha=32,
                                               seed=1, std=0.05)
    # The checkpoint's tokenizer code is copied into the modules cache: a private one for the stack's processes.
    with up_stack(path, logs, *VLLM_FLAGS, "--lora", f"{ADAPTER}={adapter_dir}", "--max-lora-rank", "8",
                  env={"HF_MODULES_CACHE": str(root / "hf-modules")}) as stack:
        chat_ = InternVLChat.load(str(path), dtype="float32", device="cpu")
        yield Family(request.param, stack, chat_, load_native(path, chat_.img_context_id), unwrap(adapted))
    if built is not None:
        built.assert_no_other_code_ran()


@pytest.fixture(scope="module")
def images(golden_dir):
    return {name: (golden_dir / f"{name}.png").read_bytes()
            for name in ("small_120x90", "wide_2200x300", "landscape_1000x700", "portrait_333x1200")}


# ------------------------------------------------------------------------------------------------------ references


@dataclass
class Reference:
    token_ids: list[int]
    logits: torch.Tensor  # [steps, vocab], transformers' raw logits of each step
    prompt_tokens: int


def reference(family: Family, question: str, tiles: list[torch.Tensor], history=None) -> Reference:
    """The reference path's greedy answer to `question` after `history` with images of `tiles` (one tensor per
    `<image>`), checked against transformers' native generation, whose logits it carries."""
    chat_ = family.chat
    _, prompt = chat_.build_prompt(question, history, [t.shape[0] for t in tiles])
    pixels = torch.cat(tiles) if tiles else None
    ids = chat_.generate_ids(prompt, pixels, GenerationParams(max_new_tokens=MAX_NEW))
    input_ids = chat_.tokenizer(prompt).input_ids
    native_ids, logits = native_greedy(family.native, input_ids, pixels, MAX_NEW, chat_.stop_id,
                                       chat_.tokenizer.pad_token_id)
    assert native_ids == ids, "the two references disagree"
    return Reference(ids, logits, len(input_ids))


def check(got: Answer, want: Reference) -> float:
    """Same tokens and prompt length as the reference, top-5 log-probabilities within LOGPROB_ATOL; the largest
    log-probability difference seen."""
    assert got.token_ids == want.token_ids
    assert got.finish.usage.prompt_tokens == want.prompt_tokens
    assert got.finish.usage.completion_tokens == len(got.token_ids)
    assert len(got.top) == len(got.token_ids)
    gaps = top_logprob_gaps(got.top, want.logits, TOP)
    assert max(gaps) <= LOGPROB_ATOL, gaps
    return max(gaps)


def ask(family: Family, content, **fields) -> Answer:
    return chat(family.stub, content, max_new_tokens=MAX_NEW, top_logprobs=TOP, timeout=120, **fields)


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


# -------------------------------------------------------------------------------------------------- the answers


# Each case: (content, the reference's question, tiles per placeholder, ChatRequest fields, tiles per image).


def case_text(images):
    return [text_part("Tell me a story about a red car.")], "Tell me a story about a red car.", [], {}, []


def case_one_image(images):
    data = images["landscape_1000x700"]
    tiles = load_image(data, max_num=4)
    return ([image_part(data), text_part("Describe the picture.")], "Describe the picture.", [tiles],
            {"max_num": 4}, [tiles.shape[0]])


def case_two_images(images):
    """Two images of 1 and 3 tiles, automatic placeholders."""
    a, b = images["small_120x90"], images["wide_2200x300"]
    tiles = [load_image(a, max_num=2), load_image(b, max_num=2)]
    return ([image_part(a), image_part(b), text_part("Compare them.")], template.multi_image_prefix(2) + "Compare them.",
            tiles, {"max_num": 2}, [t.shape[0] for t in tiles])


def case_combined(images):
    """Both images' tiles under one placeholder."""
    a, b = images["wide_2200x300"], images["small_120x90"]
    each = [load_image(a, max_num=2), load_image(b, max_num=2)]
    return ([image_part(a), image_part(b), text_part("Both pictures, one placeholder.")],
            "Both pictures, one placeholder.", [torch.cat(each)],
            {"max_num": 2, "multi_image_mode": G.MULTI_IMAGE_MODE_COMBINED}, [t.shape[0] for t in each])


def case_video(images):
    data = write_video(frames=16, fps=8, size=(96, 64))
    return ([G.ContentPart(video=G.VideoInput(data=data, num_segments=4)), text_part("What happens?")],
            template.video_prefix(4) + "What happens?", reference_frames(data, 4), {}, [1, 1, 1, 1])


CASES = {"text": case_text, "one image": case_one_image, "two images of 1 and 3 tiles": case_two_images,
         "combined": case_combined, "video": case_video}


@pytest.mark.parametrize("case", CASES)
def test_greedy_answers_and_logprobs_equal_the_reference(family, images, case):
    content, question, tiles, fields, image_tiles = CASES[case](images)
    got = ask(family, content, **fields)
    worst = check(got, reference(family, question, tiles))
    assert list(got.finish.usage.image_tiles) == image_tiles
    print(f"{family.name} {case}: {len(got.token_ids)} tokens, worst top-{TOP} logprob difference {worst:.2e}")


def test_a_sessions_second_turn_is_served_from_vllms_prefix_cache(family, images):
    data = images["portrait_333x1200"]
    tiles = load_image(data, max_num=2)
    first = ask(family, [image_part(data), text_part("What is in the picture?")], max_num=2)
    check(first, reference(family, "What is in the picture?", [tiles]))
    second = ask(family, [text_part("And what colour is it?")], session_id=first.finish.session_id)
    answer = template.clean_response(family.chat.tokenizer.decode(first.token_ids, skip_special_tokens=True))
    check(second, reference(family, "And what colour is it?", [tiles],
                            [("<image>\nWhat is in the picture?", answer)]))
    usage = second.finish.usage
    assert usage.encoded_tiles == 0 and usage.reused_tiles == tiles.shape[0]
    # vLLM caches whole blocks: every full block of the first turn's prompt (the second's prefix, image included).
    cached = usage.cached_prompt_tokens
    assert 0 < (first.finish.usage.prompt_tokens // BLOCK) * BLOCK <= cached < usage.prompt_tokens
    assert cached % BLOCK == 0


def test_n_answers_equal_single_requests_with_seed_plus_i(family, images):
    content = [image_part(images["small_120x90"]), text_part("Say something.")]
    sampling = {"max_new_tokens": MAX_NEW, "temperature": 1.0, "top_logprobs": 2}
    answers = chat_answers(family.stub, content, sampling=C.SamplingParams(n=3, seed=40, **sampling), timeout=120)
    singles = [chat_answers(family.stub, content, sampling=C.SamplingParams(seed=40 + i, **sampling),
                            timeout=120)[0] for i in range(3)]
    assert [a.token_ids for a in answers] == [s.token_ids for s in singles]
    # Rows batched together and alone add in other orders: the same alternatives, their values within the tolerance.
    for answer, single in zip(answers, singles, strict=True):
        assert [[t for t, _ in p] for p in answer.top] == [[t for t, _ in p] for p in single.top]
        assert all(abs(v - w) <= LOGPROB_ATOL for p, q in zip(answer.top, single.top, strict=True)
                   for (_, v), (_, w) in zip(p, q, strict=True))
    assert [a.finish.index for a in answers] == [0, 1, 2]
    assert len({tuple(a.token_ids) for a in answers}) > 1, "the answers did not sample"

    client = family.openai()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(
        images["small_120x90"])}}, {"type": "text", "text": "Say something."}]}]
    reply = client.chat.completions.create(model=family.stack.model, messages=messages, n=3, seed=40,
                                           temperature=1.0, max_tokens=MAX_NEW)
    assert [c.message.content for c in reply.choices] == [s.text for s in singles]
    assert reply.usage.completion_tokens == sum(len(s.token_ids) for s in singles)


def test_openai_api_answers_equal_the_reference(family, images):
    data = images["landscape_1000x700"]
    want = reference(family, "What is this?", [load_image(data, max_num=1)])
    text = template.clean_response(family.chat.tokenizer.decode(want.token_ids, skip_special_tokens=True))
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": data_url(data)}}]}]
    client = family.openai()
    options = {"model": family.stack.model, "messages": messages, "max_tokens": MAX_NEW, "temperature": 0,
               "logprobs": True, "top_logprobs": TOP, "extra_body": {"max_num": 1}}
    reply = client.chat.completions.create(**options)
    entries = reply.choices[0].logprobs.content
    assert [e.model_extra["token_id"] for e in entries] == want.token_ids
    top = [[(t.model_extra["token_id"], t.logprob) for t in e.top_logprobs] for e in entries]
    assert max(top_logprob_gaps(top, want.logits, TOP)) <= LOGPROB_ATOL
    assert reply.choices[0].message.content.strip() == text
    assert reply.usage.prompt_tokens == want.prompt_tokens

    stream = client.chat.completions.create(**options, stream=True, stream_options={"include_usage": True})
    content, ids = [], []
    for chunk in stream:
        for choice in chunk.choices:
            content.append(choice.delta.content or "")
            ids += [e.model_extra["token_id"] for e in (choice.logprobs.content if choice.logprobs else [])]
    assert ids == want.token_ids
    assert "".join(content).strip() == text


# ------------------------------------------------------------------------------------------ structured outputs

# A schema whose every valid answer is short (strict: no other properties), so a random model's greedy answer ends.
SCHEMA = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}, "round": {"type": "boolean"}},
          "required": ["colour", "round"], "additionalProperties": False}


@dataclass(frozen=True)
class Constrained:
    """One constraint as each API carries it, and the check its answer must pass."""

    grpc: C.Constraint
    http: dict  # the `openai` client's arguments (the API's extensions in `extra_body`)
    valid: Callable[[str], bool]


def _json_object(text: str) -> bool:
    return isinstance(json.loads(text), dict)


def _schema_valid(text: str) -> bool:
    jsonschema.validate(json.loads(text), SCHEMA)
    return True


CONSTRAINED = {
    "json_object": Constrained(C.Constraint(json_object=C.JsonObject()), {"response_format": {"type": "json_object"}},
                               _json_object),
    "json_schema": Constrained(
        C.Constraint(json_schema=C.JsonSchema(schema=json.dumps(SCHEMA), strict=True)),
        {"response_format": {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA,
                                                                    "strict": True}}},
        _schema_valid),
    "regex": Constrained(C.Constraint(regex="[ab]{2,6}"), {"extra_body": {"structured_outputs": {"regex": "[ab]{2,6}"}}},
                         lambda text: re.fullmatch("[ab]{2,6}", text) is not None),
    "choice": Constrained(C.Constraint(choice=C.ChoiceList(choices=["yes", "no", "maybe"])),
                          {"extra_body": {"structured_outputs": {"choice": ["yes", "no", "maybe"]}}},
                          lambda text: text in ("yes", "no", "maybe")),
}


@pytest.mark.parametrize("kind", CONSTRAINED)
def test_structured_outputs_through_both_apis(family, images, kind):
    """vLLM's structured outputs (its xgrammar backend with our grammars): a valid answer through gRPC, the same one
    through the OpenAI API (greedy), and a seeded answer reproducible and valid, with an image before the question."""
    option = CONSTRAINED[kind]
    content = [image_part(images["small_120x90"]), text_part("Describe it in the required form.")]
    greedy = chat_answers(family.stub, content, max_num=1, timeout=120,
                          sampling=C.SamplingParams(max_new_tokens=48, constraint=option.grpc))[0]
    assert greedy.finish.reason == C.FINISH_REASON_STOP, greedy.finish
    assert option.valid(greedy.text), greedy.text
    seeded = [chat_answers(family.stub, content, max_num=1, timeout=120,
                           sampling=C.SamplingParams(max_new_tokens=48, temperature=1.0, seed=7,
                                                     constraint=option.grpc))[0] for _ in range(2)]
    assert seeded[0].token_ids == seeded[1].token_ids
    # A random model sampling JSON may still be inside a string at the token limit; a finished answer is valid.
    if seeded[0].finish.reason == C.FINISH_REASON_STOP or kind in ("regex", "choice"):
        assert option.valid(seeded[0].text), seeded[0].text
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(images["small_120x90"])}},
        {"type": "text", "text": "Describe it in the required form."}]}]
    http = {**option.http, "extra_body": {"max_num": 1, **option.http.get("extra_body", {})}}
    reply = family.openai().chat.completions.create(model=family.stack.model, messages=messages, max_tokens=48,
                                                    temperature=0, **http)
    assert reply.choices[0].message.content == greedy.text


# ----------------------------------------------------------------------------------------------------- adapters


def test_an_adapter_answers_like_its_peft_reference(family, images):
    """The family's LoRA adapter (`--lora pictures=...`, served by vLLM's LoRA support) through the stack: greedy
    tokens equal PEFT's own LoRA layers on the original module tree, top-5 log-probabilities within 1e-4, for a text
    and an image question; the base beside it answers otherwise."""
    data = images["landscape_1000x700"]
    pixels = load_image(data, max_num=1)
    for question, content, tiles in (("Write the formula.", [text_part("Write the formula.")], None),
                                     ("Read the picture.", [image_part(data), text_part("Read the picture.")],
                                      pixels)):
        got = ask(family, content, max_num=1, model=ADAPTER)
        want_ids, want_top = adapter_expected(family, question, tiles)
        assert got.token_ids == want_ids, question
        for position, (served, reference_top) in enumerate(zip(got.top, want_top, strict=True)):
            assert [t for t, _ in served] == [t for t, _ in reference_top], (question, position)
            assert max(abs(a - b) for (_, a), (_, b) in zip(served, reference_top, strict=True)) < 1e-4
        base = ask(family, content, max_num=1)
        assert base.token_ids != got.token_ids, f"the adapter changed nothing for {question!r}"
    listed = [m.id for m in family.openai().models.list().data]
    assert listed == [family.stack.model, ADAPTER]


def adapter_expected(family: Family, question: str, pixels: torch.Tensor | None):
    """Greedy tokens of the PEFT-adapted original module for a first-turn question, and the top TOP (token id,
    logprob) at each position."""
    chat_ = family.chat
    _, prompt = chat_.build_prompt(question, None, [pixels.shape[0]] if pixels is not None else [])
    ids = chat_.tokenizer(prompt, return_tensors="pt").input_ids[0]
    with torch.no_grad():
        embeds = family.adapted.embed(ids)
        if pixels is not None:
            embeds[ids == chat_.img_context_id] = family.adapted.encode_images(pixels).reshape(-1, embeds.shape[-1])
        return family.adapted.greedy(embeds, MAX_NEW, stop_id=chat_.stop_id, top_k=TOP)


# ----------------------------------------------------------------------------------------------------- refusals

# What the vLLM engine refuses, with its message (README: The vLLM engine).
REFUSED = {
    "repetition_penalty": (C.SamplingParams(max_new_tokens=4, repetition_penalty=1.2),
                           {"extra_body": {"repetition_penalty": 1.2}},
                           r"repetition_penalty is not supported by this LLM server's engine \(vLLM\)"),
    "top_logprobs with a constraint": (
        C.SamplingParams(max_new_tokens=4, top_logprobs=2, constraint=C.Constraint(regex="[ab]+")),
        {"logprobs": True, "top_logprobs": 2, "extra_body": {"structured_outputs": {"regex": "[ab]+"}}},
        r"top_logprobs with a constraint is not supported by this LLM server's engine \(vLLM\)"),
}


@pytest.mark.parametrize("option", REFUSED)
def test_what_the_engine_refuses_is_refused_through_the_stack(family, option):
    sampling, http, message = REFUSED[option]
    with pytest.raises(grpc.RpcError) as info:
        chat_answers(family.stub, [text_part("Answer yes or no.")], sampling=sampling)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, info.value.details()), info.value.details()
    with pytest.raises(openai.BadRequestError, match=message):
        family.openai().chat.completions.create(
            model=family.stack.model, messages=[{"role": "user", "content": "Answer yes or no."}], max_tokens=4,
            **http)
