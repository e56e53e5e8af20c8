"""End to end with LoRA adapters: `internvl-serve up --lora ...` (Redis, vision, LLM and gateway as real processes) on
an InternLM2-shape checkpoint carrying the published sizes' tokenizer path (a sentencepiece model and the checkpoint's
own tokenizer class), serving two adapters that PEFT itself built and saved in ms-swift's layout: one of the
language model only (every InternLM2 linear layer, `wqkv` and `output` included, ms-swift's regex) and one that also
adapts the vision tower and projector.

Each adapter's greedy tokens through the gateway equal the PEFT-wrapped reference forward (written in the tests,
original module names), for a text and an image question; the base beside them equals the reference without adapter.
The `openai` client lists the adapters under /v1/models with the base as parent, answers with the one `model` names,
and gets NotFoundError for an unknown model. A session keeps its adapter; the vision adapter's image embeddings have
keys of their own, the language-only adapter's are the base's.
"""

from __future__ import annotations

import re

import grpc
import helpers.chat
import openai
import pytest
import torch
from helpers.chat import Answer, image_part, text_part
from internvl.gateway.v1 import gateway_pb2 as G
from lora_reference import (
    INTERNLM2_TARGETS,
    VISION_AND_LANGUAGE_TARGETS,
    OriginalInternVL,
    unwrap,
    write_swift_adapter,
)
from sentencepiece_checkpoint import build
from stack import up_stack

from services.model.chat import InternVLChat
from services.vision.preprocess import load_image

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

MAX_NEW = 8
TOP = 5


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build(tmp_path_factory.mktemp("lora-e2e-checkpoint"))


@pytest.fixture(scope="module")
def references(built, tmp_path_factory):
    """{model id: reference module (PEFT-wrapped for adapters)} and {adapter name: its ms-swift directory}."""
    base = OriginalInternVL(built.path)
    root = tmp_path_factory.mktemp("adapters")
    latex_dir, latex = write_swift_adapter(base, root / "latex", target_modules=INTERNLM2_TARGETS, r=8,
                                           lora_alpha=32, seed=1, std=0.05)
    vis_dir, vis = write_swift_adapter(base, root / "vis", target_modules=VISION_AND_LANGUAGE_TARGETS, r=4,
                                       lora_alpha=16, use_rslora=True, seed=2, std=0.05)
    return {"": base, "latex": unwrap(latex), "vis": unwrap(vis)}, {"latex": latex_dir, "vis": vis_dir}


@pytest.fixture(scope="module")
def stack(built, references, tmp_path_factory):
    logs = tmp_path_factory.mktemp("lora-up-logs")
    loras = [f for name, path in references[1].items() for f in ("--lora", f"{name}={path}")]
    with up_stack(built.path, logs, *loras, "--max-loras", "2", "--max-lora-rank", "8",
                  env={"HF_MODULES_CACHE": str(logs / "hf-modules")}) as running:
        yield running
    built.assert_no_other_code_ran()


@pytest.fixture(scope="module")
def stub(stack):
    return stack.stub


@pytest.fixture(scope="module")
def chat(built) -> InternVLChat:
    """The reference path's prompt building and tokenizer (the checkpoint's own class)."""
    return InternVLChat.load(str(built.path), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def picture(golden_dir):
    data = (golden_dir / "landscape_1000x700.png").read_bytes()
    return data, load_image(golden_dir / "landscape_1000x700.png", max_num=1)


def expected(chat: InternVLChat, reference, question: str, pixels: torch.Tensor | None = None):
    """Greedy tokens of `reference` (PEFT's LoRA layers in it for an adapter) for a first-turn question, and the top
    TOP (token id, logprob) at each position."""
    tiles = [pixels.shape[0]] if pixels is not None else []
    _, prompt = chat.build_prompt(question, None, tiles)
    ids = chat.tokenizer(prompt, return_tensors="pt").input_ids[0]
    with torch.no_grad():
        embeds = reference.embed(ids)
        if pixels is not None:
            slots = ids == chat.img_context_id
            embeds[slots] = reference.encode_images(pixels).reshape(-1, embeds.shape[-1])
        return reference.greedy(embeds, MAX_NEW, stop_id=chat.stop_id, top_k=TOP)


def ask(stub, content, **fields) -> Answer:
    """A greedy Chat of MAX_NEW tokens, one tile per image (`top_logprobs=TOP` for each position's alternatives)."""
    return helpers.chat.chat(stub, content, max_new_tokens=MAX_NEW, max_num=1, timeout=120, **fields)


def assert_same(served: tuple[list[int], list], reference: tuple[list[int], list], what: str) -> None:
    """Greedy tokens equal, and each position's top alternatives equal in ids and within 1e-4 in logprob."""
    assert served[0] == reference[0], what
    for position, (got, want) in enumerate(zip(served[1], reference[1], strict=True)):
        assert [t for t, _ in got] == [t for t, _ in want], f"{what}, position {position}"
        assert max(abs(a - b) for (_, a), (_, b) in zip(got, want, strict=True)) < 1e-4, f"{what}, position {position}"


def test_each_adapter_and_the_base_answer_like_their_peft_reference(stub, chat, references, picture):
    models, _ = references
    data, pixels = picture
    answers = {}
    for name, reference in models.items():
        text = ask(stub, [text_part("Write the formula.")], top_logprobs=TOP, model=name)
        assert_same((text.token_ids, text.top), expected(chat, reference, "Write the formula."), f"{name!r}, text")
        image = ask(stub, [image_part(data), text_part("Read the picture.")], top_logprobs=TOP, model=name)
        assert_same((image.token_ids, image.top), expected(chat, reference, "Read the picture.", pixels),
                    f"{name!r}, image")
        answers[name] = (text.token_ids, image.token_ids)
    # The adapters are not no-ops: each answers otherwise than the base.
    assert answers["latex"] != answers[""] and answers["vis"] != answers[""]


def test_the_openai_client_lists_and_selects_adapters(stack, stub, chat, references, built):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.http_port}/v1", api_key="unused")
    listed = client.models.list().data
    base = built.path.name
    assert [m.id for m in listed] == [base, "latex", "vis"]
    assert [m.model_extra.get("parent") for m in listed] == [None, base, base]
    question = "Write the formula."
    grpc_ids = ask(stub, [text_part(question)], model="latex").token_ids
    reply = client.chat.completions.create(model="latex", messages=[{"role": "user", "content": question}],
                                           max_tokens=MAX_NEW, temperature=0)
    assert reply.model == "latex"
    assert reply.choices[0].message.content == chat.tokenizer.decode(
        [t for t in grpc_ids if t != chat.stop_id], skip_special_tokens=True).strip()
    with pytest.raises(openai.NotFoundError, match="model 'nope' is not served; GET /v1/models"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": question}])


def test_tokens_are_counted_by_model(stack, stub):
    before = stack.metrics("llm")
    ids = ask(stub, [text_part("Count me.")], model="vis").token_ids
    after = stack.metrics("llm")

    def count(text: str) -> float:
        match = re.search(r'^internvl_llm_generated_tokens_total\{model="vis"\} (\S+)$', text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    assert count(after) - count(before) == len(ids)


def test_a_session_keeps_its_adapter_and_unknown_models_are_not_found(stub, chat, references):
    first = ask(stub, [text_part("Start.")], model="vis").finish
    later = ask(stub, [text_part("Go on.")], session_id=first.session_id)
    # The same session's next round without a model, and with the adapter named again, answer alike.
    again = ask(stub, [text_part("Go on.")], session_id=first.session_id, model="vis")
    assert later.finish.usage.cached_prompt_tokens > 0 and later.token_ids and again.token_ids
    with pytest.raises(grpc.RpcError) as refused:
        ask(stub, [text_part("Go on.")], session_id=first.session_id, model="latex")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "this session answers with model 'vis'" in refused.value.details()
    with pytest.raises(grpc.RpcError) as unknown:
        ask(stub, [text_part("Hello.")], model="nope")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_list_models_over_grpc(stub, built, references):
    models = stub.ListModels(G.ListModelsRequest(), timeout=10).models
    assert [(m.id, m.parent) for m in models] == [(built.path.name, ""), ("latex", built.path.name),
                                                   ("vis", built.path.name)]
    assert [(m.adapter.touches_vision, m.adapter.rank) for m in models[1:]] == [(False, 8), (True, 4)]
    assert len({m.adapter.digest for m in models[1:]}) == 2


def test_only_a_vision_adapter_has_image_embeddings_of_its_own(stub, golden_dir):
    data = (golden_dir / "portrait_333x1200.png").read_bytes()
    content = [image_part(data), text_part("What is it?")]
    base, latex, vis, vis_again = (ask(stub, content, model=model).finish for model in ("", "latex", "vis", "vis"))
    assert base.usage.encoded_tiles == 1
    assert latex.usage.encoded_tiles == 0  # the base's embeddings serve the language-only adapter
    assert vis.usage.encoded_tiles == 1  # its own key: a miss the first time
    assert vis_again.usage.encoded_tiles == 0
