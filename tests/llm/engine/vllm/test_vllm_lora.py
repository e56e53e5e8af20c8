"""LoRA adapters on the vLLM engine, both language-model families (conftest.py `family`, which serves `ADAPTERS`):
every answer equals PEFT's, the base beside them stays the base, adapters and the base share vLLM's steps, the
prefix cache never crosses models, and vLLM was given only each adapter's language part, never the user's directory.

The reference is PEFT itself (tests/lora_reference.py): the adapter directories were saved from PEFT models, whose
full, uncached greedy forward through PEFT's LoRA layers at the original module names defines the tokens and top
log-probabilities. Both sides run the `small` checkpoints in float32 and are fed the same prompt ids and image rows.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from helpers.engine import Recorder
from lora_reference import unwrap
from safetensors import safe_open

from services.contract.conversation import Conversation, ImageRef, Turn
from services.llm.config import LLMConfig
from services.llm.engine import factory
from services.llm.service import LLMService
from services.model.adapter_options import AdapterOptions
from services.model.adapters import read_adapter

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]

MAX_NEW = 8
TOP = 5
TOL = 1e-4
PROMPTS = ("Tell me about lighthouses.", "What is the capital of France? Answer in one word.")


def expected_answer(family, name: str, request, module=None):
    """PEFT's greedy answer (tokens, top-5 per step) to `request` on model `name`: the prompt's ids embedded by the
    reference, each image's rows in its `<IMG_CONTEXT>` slots."""
    reference = module if module is not None else family.adapted(name)
    ids = torch.tensor(request.prompt.token_ids)
    with torch.no_grad():
        embeds = reference.embed(ids).clone()
        if request.image_rows:
            slots = ids == family.prompts.img_context_id
            embeds[slots] = torch.cat(request.image_rows).to(embeds.dtype)
    return reference.greedy(embeds, request.max_new_tokens, stop_id=family.stop_id, top_k=TOP)


def assert_parity(answer, expected) -> float:
    """Tokens equal, top-5 log-probabilities within TOL; returns the largest difference."""
    tokens, top = expected
    assert answer.token_ids == tokens
    worst = 0.0
    for step, (ours, theirs) in enumerate(zip(answer.top_logprobs, top, strict=True)):
        assert ours.logprob == pytest.approx(theirs[0][1], abs=TOL), step
        assert list(ours.token_ids) == [token for token, _ in theirs], step
        assert list(ours.logprobs) == pytest.approx([value for _, value in theirs], abs=TOL), step
        worst = max(worst, *(abs(a - b) for a, (_, b) in zip(ours.logprobs, theirs, strict=True)))
    return worst


def differs(a, b) -> bool:
    """Two reference answers are different models' (tokens, or first-step log-probabilities)."""
    return a[0] != b[0] or abs(a[1][0][0][1] - b[1][0][0][1]) > 1e-3


def ask(family, text: str, adapter: str = "", images=(), **sampling):
    parts = tuple(ImageRef(name, family.pixels[name].shape[0]) for name in images)
    sampling.setdefault("max_new_tokens", MAX_NEW)
    sampling.setdefault("top_logprobs", TOP)
    return family.request(Conversation(user_parts=(*parts, text)), images, adapter=adapter, **sampling)


async def test_text_answers_equal_peft_and_the_base_stays_the_base(family):
    worst = 0.0
    for text in PROMPTS:
        base = expected_answer(family, "", ask(family, text))
        for name in ["", *family.adapters]:
            request = ask(family, text, name)
            expected = expected_answer(family, name, request)
            if name:
                assert differs(expected, base), f"{name} is a no-op on {text!r}"
            [answer] = await family.collect(family.engine.submit(request))
            worst = max(worst, assert_parity(answer, expected))
    print(f"{family.name}: worst top-5 logprob difference to PEFT {worst:.2e}")


async def test_the_lm_heads_lora_is_applied(family):
    """The adapter that adapts the LM head (Qwen2's `lm_head`, InternLM2's `output`): without the head's LoRA the
    reference differs by more than the tolerance, so the parity above holds only with it."""
    name = "q-plain" if family.name == "qwen2" else "i-plain"
    request = ask(family, PROMPTS[0], name)
    headless = copy.deepcopy(unwrap(family.adapters[name][1]))
    head = headless.language_model.head
    with torch.no_grad():
        for parameter in head.lora_B.parameters():
            parameter.zero_()
    without, expected = expected_answer(family, name, request, module=headless), expected_answer(family, name, request)
    assert without[0] != expected[0] or max(abs(a[1] - b[1]) for x, y in zip(without[1], expected[1], strict=True)
                                            for a, b in zip(x, y, strict=True)) > 10 * TOL
    [answer] = await family.collect(family.engine.submit(request))
    assert_parity(answer, expected)


async def test_image_answers_equal_peft(family):
    """The rows are what the vision service serves for the model: the adapter's own encoding when it touches the
    vision side (q-vision: this engine applies only its language part), under a key of its own (the vision service's
    keys include such an adapter's digest; vLLM trusts the key as the rows' identity), else the base's."""
    for name in ["", *family.adapters]:
        vision = name == "q-vision"
        with torch.no_grad():
            rows = family.adapted(name if vision else "").encode_images(family.pixels["small"])
        key = f"small@{name}" if vision else "small"
        request = family.request(Conversation(user_parts=(ImageRef(key, 1), "What is in the image?")), (),
                                 adapter=name, max_new_tokens=MAX_NEW, top_logprobs=TOP)
        request = dataclasses.replace(request, image_rows=(rows.reshape(-1, rows.shape[-1]),))
        [answer] = await family.collect(family.engine.submit(request))
        assert_parity(answer, expected_answer(family, name, request))


async def test_several_adapters_and_the_base_share_steps(family):
    """Two streams for the base and for each adapter, submitted at once: they decode in shared steps, and each equals
    its solo run and PEFT."""
    names = ["", *family.adapters]
    requests = [ask(family, f"Stream {i}: {PROMPTS[i % 2]}", names[i // 2], max_new_tokens=5 + i)
                for i in range(2 * len(names))]
    solo = [(await family.collect(family.engine.submit(r)))[0] for r in requests]
    recorder = Recorder(family.engine)
    try:
        together = await asyncio.gather(*(family.collect(family.engine.submit(r)) for r in requests))
    finally:
        family.engine.observer = recorder.inner
    assert max(decode for decode, _ in recorder.steps) >= len(names) + 1  # rows of several models in one step
    for i, ([mixed], alone) in enumerate(zip(together, solo, strict=True)):
        assert mixed.token_ids == alone.token_ids, i
        assert_parity(mixed, expected_answer(family, names[i // 2], requests[i]))


async def test_the_prefix_cache_is_kept_per_adapter(family):
    """A second turn on an adapter reuses its first turn's blocks; the same second turn on the base or on another
    adapter does not (vLLM keys its blocks by the adapter)."""
    name, other = list(family.adapters)[:2]
    question = f"{family.name}: what is in this picture, in the adapter's words?"
    first = ask(family, question, name, ["portrait"])
    [answer] = await family.collect(family.engine.submit(first))
    history = (Turn((ImageRef("portrait", 1), question), answer.text.strip()),)

    async def second_turn(adapter: str):
        request = family.request(Conversation(user_parts=("And its colour?",), history=history), ("portrait",),
                                 adapter=adapter, max_new_tokens=4)
        [reply] = await family.collect(family.engine.submit(request))
        return request, reply.finish.usage.cached_prompt_tokens

    request, cached = await second_turn(name)
    assert (len(first.prompt) // 128) * 128 <= cached < len(request.prompt)
    # The blocks before the image are text every request of a model shares (the system prompt: more than a block
    # with InternLM2's tokenizer), which the base or the other adapter may have cached from other tests; no block
    # from the image on may be found outside the adapter.
    shared_text = (request.prompt.token_ids.index(family.prompts.img_start_id) // 128) * 128
    assert (await second_turn(""))[1] <= shared_text < cached
    assert (await second_turn(other))[1] <= shared_text


async def test_vllm_got_the_language_part_in_a_copy_of_its_own(family):
    """Each copy holds exactly the adapter's language weights, in vLLM's module names; the user's directory is as it
    was written."""
    for name, (directory, _) in family.adapters.items():
        copy_dir = Path(family.engine.keeper.loras[name].lora_path)
        assert not copy_dir.is_relative_to(directory)
        adapter = read_adapter(name, directory, family.chat.checkpoint, max_rank=64)
        with safe_open(copy_dir / "adapter_model.safetensors", framework="pt") as weights:
            keys = list(weights.keys())
        modules = {key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for key in keys}
        expected = {m.replace("language_model.output", "language_model.lm_head")
                    for m in adapter.modules if m.startswith("language_model.")}
        assert modules == expected and len(keys) == 2 * len(expected)
        assert family.adapter_files[name] == files_of(directory)


def files_of(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir()}


async def test_model_info_lists_the_adapters(family, monkeypatch):
    """What GetModelInfo reports of a vLLM-engine service: every adapter, with its digest (the service's,
    engine-independent part; the family's engine stands in for the one the factory would build)."""
    options = AdapterOptions(loras=tuple((name, str(directory)) for name, (directory, _) in family.adapters.items()))
    monkeypatch.setitem(factory.ENGINES, "vllm", lambda inputs: family.engine)
    observer = family.engine.observer
    try:
        service = LLMService.load(LLMConfig(model=str(family.path), dtype="float32", device="cpu", engine="vllm",
                                            adapters=options, max_context_tokens=4096))
    finally:
        family.engine.observer = observer
    expected = tuple(read_adapter(name, directory, family.chat.checkpoint, max_rank=64).info()
                     for name, (directory, _) in family.adapters.items())
    assert service.model_info().adapters == expected
    assert [info.touches_vision for info in expected] == [name == "q-vision" for name in family.adapters]
