"""An EngineRequest in vLLM's terms (services.llm.engine.vllm.requests): the folded prompt, the image inputs, the
sampling parameters, and the refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from services.contract.constraint import Constraint, ConstraintKind
from services.contract.conversation import Conversation, ImageRef, Turn, VideoRef
from services.contract.errors import InvalidArgumentError
from services.contract.sampling import SamplingParams
from services.llm.engine.events import EngineRequest, TopLogprobs
from services.llm.engine.vllm.requests import (
    PromptFolder,
    engine_prompt,
    refusal,
    sampling_params,
    top_logprobs,
)
from services.llm.prompt import PromptBuilder
from services.model.checkpoint import open_checkpoint
from services.model.modules import load_tokenizer

PLACEHOLDER = [27, 1805, 29]  # what the Qwen2 tokenizer makes of "<image>"


@pytest.fixture(scope="module")
def builder(tiny_checkpoint):
    tokenizer = load_tokenizer(open_checkpoint(tiny_checkpoint()))
    assert tokenizer.encode("<image>", add_special_tokens=False) == PLACEHOLDER
    return PromptBuilder(tokenizer, 256, None, 32768)


@pytest.fixture(scope="module")
def folder(builder):
    return PromptFolder(PLACEHOLDER, builder.img_start_id, builder.img_context_id, builder.img_end_id)


def expand(ids: list[int], rows: list[int], builder) -> list[int]:
    """What vLLM's InternVL processor does to the folded ids: each placeholder, in order, becomes `<img>` + rows
    IMG_CONTEXT + `</img>`."""
    out, i, image = [], 0, 0
    while i < len(ids):
        if ids[i:i + len(PLACEHOLDER)] == PLACEHOLDER:
            out += [builder.img_start_id] + [builder.img_context_id] * rows[image] + [builder.img_end_id]
            i, image = i + len(PLACEHOLDER), image + 1
        else:
            out.append(ids[i])
            i += 1
    return out


CONVERSATIONS = {
    "text": Conversation(user_parts=("Hello <img> tags </img> stay text",)),
    "one image": Conversation(user_parts=(ImageRef("a", 1), "Describe.")),
    "two images": Conversation(user_parts=(ImageRef("a", 1), ImageRef("b", 3), "Compare.")),
    "video": Conversation(user_parts=(VideoRef((ImageRef("f1", 1), ImageRef("f2", 1))), "What happens?")),
    "history": Conversation(user_parts=("And now?",), history=(Turn((ImageRef("a", 2), "First?"), "An answer."),)),
}


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_folding_then_vllms_expansion_gives_back_our_ids(builder, folder, name):
    prompt = builder.build(CONVERSATIONS[name])
    folded = folder.fold(prompt)
    assert folded.count(builder.img_context_id) == 0
    assert expand(folded, [image.num_tiles * 256 for image in prompt.images], builder) == list(prompt.token_ids)
    assert len(folded) == len(prompt) - sum(image.num_tiles * 256 + 2 - len(PLACEHOLDER) for image in prompt.images)


def test_a_run_of_the_wrong_length_is_refused(builder, folder):
    prompt = builder.build(CONVERSATIONS["two images"])
    start = prompt.token_ids.index(builder.img_start_id)
    short = prompt.token_ids[:start + 1] + prompt.token_ids[start + 2:]
    with pytest.raises(ValueError, match="image 0"):
        folder.fold(type(prompt)(prompt.text, short, prompt.images, prompt.tokens_per_tile, prompt.image_offsets))
    with pytest.raises(ValueError, match="2 image runs for 3 images"):
        folder.fold(type(prompt)(prompt.text, prompt.token_ids, prompt.images + (ImageRef("c", 1),),
                                 prompt.tokens_per_tile, prompt.image_offsets))


def request(conversation, builder, rows=(), **sampling) -> EngineRequest:
    return EngineRequest(builder.build(conversation), SamplingParams(**sampling), max_new_tokens=7,
                         image_rows=tuple(rows))


def test_one_image_is_one_3d_tensor_several_a_list_keyed_by_our_keys(builder, folder):
    one = torch.ones(256, 16, dtype=torch.bfloat16)
    single = engine_prompt(request(CONVERSATIONS["one image"], builder, [one]), folder, torch.float32)
    assert single["multi_modal_data"]["image"].shape == (1, 256, 16)
    assert single["multi_modal_data"]["image"].dtype == torch.float32
    assert single["multi_modal_uuids"] == {"image": ["a"]}
    rows = [torch.ones(256, 16), torch.full((768, 16), 2.0)]
    several = engine_prompt(request(CONVERSATIONS["two images"], builder, rows), folder, torch.float32)
    assert [tuple(t.shape) for t in several["multi_modal_data"]["image"]] == [(256, 16), (768, 16)]
    assert several["multi_modal_uuids"] == {"image": ["a", "b"]}
    text = engine_prompt(request(CONVERSATIONS["text"], builder), folder, torch.float32)
    assert set(text) == {"prompt_token_ids"}


def test_the_cache_salt_goes_into_the_prompt_when_set(builder, folder):
    salted = dataclasses.replace(request(CONVERSATIONS["text"], builder), cache_salt="0123abcd")
    assert engine_prompt(salted, folder, torch.float32)["cache_salt"] == "0123abcd"
    assert "cache_salt" not in engine_prompt(request(CONVERSATIONS["text"], builder), folder, torch.float32)


def test_sampling_parameters_of_each_answer(builder):
    base = request(CONVERSATIONS["text"], builder, temperature=0.7, top_p=0.9, top_k=20, seed=2**64 - 1, n=3,
                   presence_penalty=0.5, frequency_penalty=-1.0, logit_bias=((5, 2.0), (9, -100.0)), top_logprobs=4)
    params = [sampling_params(base, i, stop_token_id=151645) for i in range(3)]
    assert [p.seed for p in params] == [2**64 - 1, 0, 1]  # seed + i modulo 2**64, as a single request's
    first = params[0]
    assert (first.n, first.max_tokens, first.temperature, first.top_p, first.top_k) == (1, 7, 0.7, 0.9, 20)
    assert (first.presence_penalty, first.frequency_penalty, first.repetition_penalty) == (0.5, -1.0, 1.0)
    assert first.logit_bias == {5: 2.0, 9: -100.0}
    assert first.logprobs == 4
    assert first.stop_token_ids == [151645] and first.ignore_eos and not first.detokenize
    assert first.stop == []  # stop strings are ours
    greedy = sampling_params(request(CONVERSATIONS["text"], builder), 0, stop_token_id=151645)
    assert (greedy.temperature, greedy.top_p, greedy.top_k, greedy.seed, greedy.logprobs) == (0.0, 1.0, 0, None, None)
    assert greedy.logit_bias is None


REGEX = Constraint(ConstraintKind.REGEX, pattern="[ab]+")


@pytest.mark.parametrize(("sampling", "names"), [
    ({"repetition_penalty": 1.3}, "repetition_penalty"),
    ({"constraint": REGEX, "top_logprobs": 1}, "top_logprobs with a constraint"),
])
def test_what_this_engine_refuses_names_the_option(builder, sampling, names):
    engine_request = EngineRequest(builder.build(CONVERSATIONS["text"]), SamplingParams(**sampling), 5,
                                   grammar=object())
    problem = refusal(engine_request)
    assert isinstance(problem, InvalidArgumentError) and names in str(problem)


def test_constraints_and_adapters_are_taken(builder):
    request = EngineRequest(builder.build(CONVERSATIONS["text"]), SamplingParams(constraint=REGEX), 5,
                            grammar=object(), adapter="latex-ocr")
    assert refusal(request) is None
    params = sampling_params(request, 0, stop_token_id=151645, grammar='root ::= "a"')
    assert params.structured_outputs.grammar == 'root ::= "a"'
    assert sampling_params(request, 0, stop_token_id=151645).structured_outputs is None


@pytest.mark.parametrize("penalty", [0.0, 1.0])
def test_a_repetition_penalty_that_is_off_is_accepted(builder, penalty):
    assert refusal(request(CONVERSATIONS["text"], builder, repetition_penalty=penalty)) is None


def test_vllms_logprobs_as_our_report():
    from vllm.logprobs import Logprob

    # The sampled token first (its own rank), then the top 3 (ranks 1..3), as vLLM builds the dict.
    inside = {7: Logprob(-0.5, 2, None), 3: Logprob(-0.1, 1, None), 9: Logprob(-0.9, 3, None)}
    assert top_logprobs(inside, 7, 3) == TopLogprobs(-0.5, (3, 7, 9), (-0.1, -0.5, -0.9))
    outside = {5: Logprob(-4.0, 12, None), 3: Logprob(-0.1, 1, None), 7: Logprob(-0.5, 2, None),
               9: Logprob(-0.9, 3, None)}
    assert top_logprobs(outside, 5, 3) == TopLogprobs(-4.0, (3, 7, 9), (-0.1, -0.5, -0.9))
    # Sampled with the 3rd's very logprob, but not among the top 3: not reported as one of them.
    tied = {5: Logprob(-0.9, 3, None), 3: Logprob(-0.1, 1, None), 7: Logprob(-0.5, 2, None), 9: Logprob(-0.9, 3, None)}
    assert top_logprobs(tied, 5, 3) == TopLogprobs(-0.9, (3, 7, 9), (-0.1, -0.5, -0.9))
