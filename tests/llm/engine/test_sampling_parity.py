"""The service's sampled tokens against the original path (transformers' generate(inputs_embeds=...)), exactly.

The reference is `InternVLChat.generate_ids`: generate with inputs_embeds only, so the repetition penalty sees the
generated tokens alone, and a seeded sample is `torch.manual_seed(seed)` then generate(do_sample=True). Both sides
run the tiny checkpoint in float32 on CPU, one request at a time.
"""

from __future__ import annotations

from functools import partial

import helpers.engine
import pytest
import torch

from services.contract.conversation import GenerateRequest
from services.model.chat import GenerationParams

pytestmark = [
    pytest.mark.asyncio, pytest.mark.timeout(300),
    # transformers' own statement of the semantics compared here: the penalty counts the generated tokens only.
    pytest.mark.filterwarnings("ignore:Passing `repetition_penalty` with `inputs_embeds`:UserWarning"),
]

QUESTION = "Tell me a story about a lighthouse."
MAX_NEW = 24


ask = partial(helpers.engine.ask, max_new_tokens=MAX_NEW)


async def service_ids(make_service, collect, requests: list[GenerateRequest]) -> list[list[int]]:
    """The tokens of each request, run one after another on one service."""
    async with make_service() as service:
        return [(await collect(await service.generate(r))).token_ids for r in requests]


@torch.inference_mode()
def generate_with_prompt_ids(chat, prompt: str, **kwargs) -> list[int]:
    """generate(input_ids=prompt): the repetition penalty's input_ids then hold the prompt too (what is NOT wanted)."""
    input_ids = chat.tokenizer(prompt, return_tensors="pt").input_ids
    output = chat.language_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                          eos_token_id=chat.stop_id, pad_token_id=chat.tokenizer.pad_token_id,
                                          max_new_tokens=MAX_NEW, **kwargs)
    return output[0, input_ids.shape[1]:].tolist()


@torch.inference_mode()
def generate_embeds(chat, prompt: str, params: GenerationParams, **overrides) -> list[int]:
    """`generate_ids` with some of generate's kwargs replaced."""
    input_ids = chat.tokenizer(prompt, return_tensors="pt").input_ids
    embeds = chat.language_model.get_input_embeddings()(input_ids)
    kwargs = {**params.as_kwargs(), **overrides}
    output = chat.language_model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids),
                                          eos_token_id=chat.stop_id, pad_token_id=chat.tokenizer.pad_token_id,
                                          **kwargs)
    return output[0].tolist()


@pytest.mark.parametrize("penalty, penalises_answer", [(1.8, False), (0.5, True)])
async def test_greedy_repetition_penalty_counts_generated_tokens_only(reference, make_service, collect, penalty,
                                                                      penalises_answer):
    """The penalty's tokens are the generated ones, not the prompt's.

    The question quotes the unpenalised answer, so that its tokens are in the prompt and penalising the prompt too
    (what generate(input_ids=...) does) changes the answer. The random tiny model does not repeat its own tokens
    within 24 greedy steps, so 1.8 never changes its answer through generated tokens; 0.5 (a reward) makes it
    repeat, so there the generated tokens' penalty decides the answer as well.
    """
    chat = reference("qwen2")
    _, plain_prompt = chat.build_prompt(QUESTION, None, [])
    plain = chat.generate_ids(plain_prompt, None, GenerationParams(max_new_tokens=MAX_NEW))
    question = f"{QUESTION} {chat.tokenizer.decode(plain[:12], skip_special_tokens=True)}"
    _, prompt = chat.build_prompt(question, None, [])
    expected = chat.generate_ids(prompt, None, GenerationParams(max_new_tokens=MAX_NEW, repetition_penalty=penalty))
    assert expected != generate_with_prompt_ids(chat, prompt, do_sample=False, repetition_penalty=penalty)
    unpenalised = chat.generate_ids(prompt, None, GenerationParams(max_new_tokens=MAX_NEW))
    assert (expected != unpenalised) == penalises_answer
    [ours] = await service_ids(make_service, collect, [ask(question, repetition_penalty=penalty)])
    assert ours == expected


SEEDS = (0, 1, 7)


async def test_seeded_sampling_equals_manual_seed_then_generate(reference, make_service, collect):
    chat = reference("qwen2")
    _, prompt = chat.build_prompt(QUESTION, None, [])
    params = GenerationParams(max_new_tokens=MAX_NEW, do_sample=True, temperature=0.8, top_p=0.9, top_k=40,
                              repetition_penalty=1.2)
    expected = []
    for seed in SEEDS:
        torch.manual_seed(seed)
        expected.append(chat.generate_ids(prompt, None, params))
    assert len(set(map(tuple, expected))) == len(SEEDS), "the seeds should give different samples"
    ours = await service_ids(make_service, collect, [
        ask(QUESTION, temperature=0.8, top_p=0.9, top_k=40, repetition_penalty=1.2, seed=seed) for seed in SEEDS])
    assert ours == expected


async def test_seeded_sampling_with_top_k_off(reference, make_service, collect):
    """The service's top_k=0 is "off". GenerationParams.as_kwargs passes top_k=None for it, and generate's kwargs
    override GenerationConfig's defaults, None included: off there too, not the default top_k=50 (which generate
    would use were top_k left out). The sampled answers show it."""
    chat = reference("qwen2")
    _, prompt = chat.build_prompt(QUESTION, None, [])
    params = GenerationParams(max_new_tokens=MAX_NEW, do_sample=True, temperature=1.3, top_p=0.97,
                              repetition_penalty=1.1)
    assert params.as_kwargs()["top_k"] is None
    expected, with_50 = [], []
    for seed in SEEDS:
        torch.manual_seed(seed)
        expected.append(chat.generate_ids(prompt, None, params))
        torch.manual_seed(seed)
        with_50.append(generate_embeds(chat, prompt, params, top_k=50))
    assert all(a != b for a, b in zip(expected, with_50, strict=True))
    ours = await service_ids(make_service, collect, [
        ask(QUESTION, temperature=1.3, top_p=0.97, repetition_penalty=1.1, seed=seed) for seed in SEEDS])
    assert ours == expected
