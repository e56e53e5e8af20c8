"""LoRA adapters in the LLM service: every answer equals PEFT's, the base beside them stays the base, and requests
for different adapters and for the base share the engine's steps without changing one another's tokens.

The reference is PEFT itself: `lora_reference.write_swift_adapter` writes an ms-swift adapter and returns the PEFT
model it was saved from, whose `greedy` (a full, uncached forward through PEFT's LoRA layers at the original module
names) defines the tokens and top log-probabilities. The service reads the adapter from disk (LLMService.load with
--lora), maps it onto transformers' modules and applies it per row; both sides run the tiny checkpoints in float32 on
CPU and are fed the same prompt token ids (built by the service's PromptBuilder) and image embeddings.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import helpers.engine
import pytest
import torch
from helpers.engine import Recorder
from internvl.llm.v1 import llm_pb2
from lora_reference import (
    INTERNLM2_TARGETS,
    QWEN2_TARGETS,
    VISION_AND_LANGUAGE_TARGETS,
    OriginalInternVL,
    unwrap,
    write_swift_adapter,
)

from services.contract.conversation import Conversation, GenerateRequest, ImageRef
from services.contract.errors import InternVLError, NotFoundError
from services.contract.model_info import AdapterInfo, ModelInfo
from services.llm.config import LLMConfig
from services.llm.engine.events import EngineRequest
from services.llm.engine.sampling import SamplingParams
from services.llm.metrics import LLMMetrics
from services.llm.server import LLMServicer
from services.llm.service import LLMService
from services.model.adapter_options import AdapterOptions
from services.model.adapters import read_adapter
from services.model.checkpoint import open_checkpoint

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(300)]

MAX_NEW = 8
TOP = 5
TOL = 1e-4

# Adapters of each tiny checkpoint: ranks differ (the stacks are padded), one uses rsLoRA, one touches the vision side.
ADAPTERS = {
    "qwen2": {
        "q-plain": {"target_modules": QWEN2_TARGETS, "r": 8, "lora_alpha": 32, "seed": 1},
        "q-rslora": {"target_modules": QWEN2_TARGETS, "r": 4, "lora_alpha": 16, "use_rslora": True, "seed": 2},
        "q-vision": {"target_modules": VISION_AND_LANGUAGE_TARGETS, "r": 8, "lora_alpha": 32, "seed": 3},
    },
    "internlm2": {  # INTERNLM2_TARGETS include the fused wqkv and the LM head `output`
        "i-plain": {"target_modules": INTERNLM2_TARGETS, "r": 8, "lora_alpha": 32, "seed": 1},
        "i-rslora": {"target_modules": INTERNLM2_TARGETS, "r": 16, "lora_alpha": 32, "use_rslora": True, "seed": 2},
    },
}

PROMPTS = ("Tell me about lighthouses.", "What is the capital of France? Answer in one word.")


@dataclass
class World:
    """One tiny checkpoint, its original-format reference, and PEFT adapters written for it."""

    directory: Path
    original: OriginalInternVL
    adapters: dict[str, tuple[Path, object]]  # name -> (ms-swift checkpoint dir, PEFT model)

    def reference(self, name: str) -> OriginalInternVL:
        """The module whose forwards are the answer of model `name` ("" the base)."""
        return unwrap(self.adapters[name][1]) if name else self.original

    def options(self, *names: str) -> AdapterOptions:
        return AdapterOptions(loras=tuple((name, str(self.adapters[name][0])) for name in names))


@pytest.fixture(scope="module")
def world(tiny_checkpoint, tmp_path_factory):
    made: dict[str, World] = {}

    def get(llm: str) -> World:
        if llm not in made:
            directory = tiny_checkpoint(llm=llm)
            original = OriginalInternVL(directory)
            adapters = {name: write_swift_adapter(original, tmp_path_factory.mktemp(f"lora-{name}"), **spec)
                        for name, spec in ADAPTERS[llm].items()}
            made[llm] = World(Path(directory), original, adapters)
        return made[llm]

    return get


@contextlib.asynccontextmanager
async def serving(world: World, *adapters: str, **overrides):
    """A started LLMService loaded from disk (a fresh model: adapters are installed into it) with `adapters`."""
    overrides.setdefault("kv_cache_budget_mb", 0)
    config = LLMConfig(model=str(world.directory), dtype="float32", device="cpu", adapters=world.options(*adapters),
                       **overrides)
    service = LLMService.load(config, LLMMetrics())
    await service.start()
    try:
        yield service
    finally:
        await service.close()


ask = partial(helpers.engine.ask, max_new_tokens=MAX_NEW, top_logprobs=TOP)


def expected_answer(world: World, name: str, service: LLMService, request: GenerateRequest,
                    images: dict[str, torch.Tensor] | None = None, max_new_tokens: int = MAX_NEW):
    """PEFT's greedy answer to `request`: the service's prompt ids, embedded by the reference with each image's rows
    in its `<IMG_CONTEXT>` slots."""
    prompt = service.prompts.build(request.conversation)
    reference = world.reference(name)
    ids = torch.tensor(prompt.token_ids)
    with torch.no_grad():
        embeds = reference.embed(ids).clone()
        if prompt.images:
            slots = ids == service.prompts.img_context_id
            embeds[slots] = torch.cat([images[image.key] for image in prompt.images]).to(embeds.dtype)
            assert int(slots.sum()) == sum(image.num_tiles for image in prompt.images) * 256
    return reference.greedy(embeds, max_new_tokens, stop_id=service.engine.stop_token_id, top_k=TOP)


def assert_parity(result, expected) -> None:
    tokens, top = expected
    assert result.token_ids == tokens
    assert len(result.top_logprobs) == len(top)
    for step, (ours, theirs) in enumerate(zip(result.top_logprobs, top, strict=True)):
        assert ours.logprob == pytest.approx(theirs[0][1], abs=TOL), step
        assert list(ours.logprobs) == pytest.approx([value for _, value in theirs], abs=TOL), step
        found = dict(zip(ours.token_ids, ours.logprobs, strict=True))
        for token, value in theirs:
            if token in found:
                assert found[token] == pytest.approx(value, abs=TOL), (step, token)
            else:  # only a tie at the cut may put another token in the top 5
                assert value == pytest.approx(ours.logprobs[-1], abs=TOL), (step, token)


def differs(a, b) -> bool:
    """Two reference answers (tokens, top) are different models' (tokens, or first-step log-probabilities)."""
    return a[0] != b[0] or abs(a[1][0][0][1] - b[1][0][0][1]) > 1e-3


@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
async def test_text_answers_equal_peft_and_the_base_stays_the_base(world, collect, llm):
    w = world(llm)
    names = list(ADAPTERS[llm])
    async with serving(w, *names) as service:
        for text in PROMPTS:
            base = expected_answer(w, "", service, ask(text))
            for name in ["", *names]:
                request = ask(text, adapter=name)
                expected = expected_answer(w, name, service, request)
                if name:
                    assert differs(expected, base), f"{name} is a no-op on {text!r}"
                assert_parity(await collect(await service.generate(request)), expected)


async def test_base_beside_adapters_is_the_plain_base_bit_for_bit(world, collect):
    w = world("internlm2")
    requests = [ask(text) for text in PROMPTS]
    async with serving(w) as plain:
        alone = [await collect(await plain.generate(r)) for r in requests]
    async with serving(w, *ADAPTERS["internlm2"]) as service:
        beside = [await collect(await service.generate(r)) for r in requests]
    for a, b in zip(alone, beside, strict=True):
        assert a.token_ids == b.token_ids
        assert [t.logprobs for t in a.top_logprobs] == [t.logprobs for t in b.top_logprobs]


@pytest.fixture(scope="module")
def tile(pixels):
    return pixels["small"]  # [1, 3, 448, 448]


@pytest.mark.parametrize(("llm", "name"), [("qwen2", ""), ("qwen2", "q-plain"), ("qwen2", "q-vision"),
                                           ("internlm2", "i-plain")])
async def test_image_answer_equals_peft(world, collect, tile, llm, name):
    """The embeddings are what the vision service serves for the model: the adapter's own encoding when it touches
    the vision side (q-vision), else the base's. The LLM applies the adapter's language part only."""
    w = world(llm)
    with torch.no_grad():
        rows = w.reference(name if name == "q-vision" else "").encode_images(tile)
    images = {"img": rows.reshape(-1, rows.shape[-1])}
    request = ask("What is in the image?", ImageRef("img", tile.shape[0]), adapter=name)
    async with serving(w, *ADAPTERS[llm]) as service:
        expected = expected_answer(w, name, service, request, images)
        assert_parity(await collect(await service.generate(request, images)), expected)


async def test_chunked_prefill_with_an_adapter_equals_peft(world, collect):
    w = world("qwen2")
    request = ask("Once upon a time " * 30 + "what happened?", adapter="q-rslora")
    async with serving(w, "q-plain", "q-rslora", max_step_tokens=40) as service:
        recorder = Recorder(service.engine)
        expected = expected_answer(w, "q-rslora", service, request)
        assert_parity(await collect(await service.generate(request)), expected)
    prefills = [tokens for _, tokens in recorder.steps if tokens]
    assert len(prefills) > 2, "the prompt was not prefilled in chunks"


async def test_eight_streams_over_three_adapters_and_the_base_share_steps(world, collect):
    """2 streams for each of the base and three adapters, submitted at once: they decode in shared steps, rows of
    every model in one forward, rows leaving at different lengths, and each stream's answer is its solo answer."""
    w = world("qwen2")
    names = ["", *ADAPTERS["qwen2"]]
    async with serving(w, *ADAPTERS["qwen2"]) as service:
        def request(i: int) -> EngineRequest:
            conversation = Conversation(user_parts=(f"Stream {i}: {PROMPTS[i % 2]}",))
            return EngineRequest(prompt=service.prompts.build(conversation),
                                 sampling=SamplingParams(max_new_tokens=5 + i, top_logprobs=TOP),
                                 max_new_tokens=5 + i, adapter=names[i // 2])

        requests = [request(i) for i in range(8)]
        engine = service.engine
        solo = [await collect(engine.submit(r)) for r in requests]

        forwards: list[list[int]] = []  # the slot of each row, for every forward with adapters
        rows = engine.adapters.rows

        def recording(slots, device):
            forwards.append(list(slots))
            return rows(slots, device)

        engine.adapters.rows = recording
        recorder = Recorder(engine)
        steps_before = engine.steps
        streams = [engine.submit(r) for r in requests]  # no await between: one admission
        together = await asyncio.gather(*(collect(s) for s in streams))
        steps = engine.steps - steps_before

    for i, (a, b) in enumerate(zip(together, solo, strict=True)):
        assert a.token_ids == b.token_ids, i
        assert len(a.token_ids) == 5 + i
        for x, y in zip(a.top_logprobs, b.top_logprobs, strict=True):
            assert list(x.logprobs) == pytest.approx(list(y.logprobs), abs=TOL)
    # The adapters answer differently from the base (else sharing a step proves nothing).
    for i in range(2, 8):
        assert solo[i].token_ids != solo[i % 2].token_ids or abs(
            solo[i].top_logprobs[0].logprob - solo[i % 2].top_logprobs[0].logprob) > 1e-3, i
    tokens = sum(len(r.token_ids) for r in together)
    assert steps < tokens
    assert max(decode for decode, _ in recorder.steps) == 8
    mixed = [f for f in forwards if set(f) == {0, 1, 2, 3}]
    assert len(mixed) >= 4, forwards
    assert engine.adapters.slots_of(names) == [0, 1, 2, 3]


async def test_prefix_cache_never_crosses_models(world, collect):
    w = world("qwen2")
    text = "A prompt long enough to be worth caching, about the sea and its lighthouses."
    async with serving(w, "q-plain", "q-rslora", kv_cache_budget_mb=64) as service:
        async def run(adapter: str):
            return await collect(await service.generate(ask(text, adapter=adapter)))

        first_a = await run("q-plain")
        base = await run("")
        other = await run("q-rslora")
        again_a = await run("q-plain")
        again_base = await run("")
        expected_base = expected_answer(w, "", service, ask(text))
        expected_other = expected_answer(w, "q-rslora", service, ask(text, adapter="q-rslora"))
    prompt_tokens = first_a.finish.usage.prompt_tokens
    assert first_a.finish.usage.cached_prompt_tokens == 0
    assert base.finish.usage.cached_prompt_tokens == 0
    assert other.finish.usage.cached_prompt_tokens == 0
    assert again_a.finish.usage.cached_prompt_tokens == prompt_tokens - 1
    assert again_base.finish.usage.cached_prompt_tokens == prompt_tokens - 1
    assert again_a.token_ids == first_a.token_ids and again_base.token_ids == base.token_ids
    assert_parity(base, expected_base)
    assert_parity(other, expected_other)


async def test_unknown_adapter_is_not_found(world, collect):
    w = world("qwen2")
    async with serving(w, "q-plain") as service:
        with pytest.raises(NotFoundError, match="'nope'.*q-plain"):
            await service.generate(ask("Hi", adapter="nope"))
        # The service is the one place that refuses it (services.llm.intake); an engine handed one anyway, a
        # caller's bug, fails that request at admission without computing anything.
        prompt = service.prompts.build(ask("Hi").conversation)
        stream = service.engine.submit(EngineRequest(prompt=prompt, sampling=SamplingParams(), max_new_tokens=2,
                                                     adapter="nope"))
        with pytest.raises(InternVLError, match="failed computing this request"):
            await collect(stream)
        assert service.engine.steps == 0
    async with serving(w) as plain:
        with pytest.raises(NotFoundError, match="'q-plain'"):
            await plain.generate(ask("Hi", adapter="q-plain"))


async def test_token_counters_are_labelled_by_model(world, collect):
    w = world("qwen2")
    async with serving(w, "q-plain", "q-rslora") as service:
        plain = await collect(await service.generate(ask(PROMPTS[0], adapter="q-plain", max_new_tokens=3)))
        plain2 = await collect(await service.generate(ask(PROMPTS[1], adapter="q-plain", max_new_tokens=4)))
        base = await collect(await service.generate(ask(PROMPTS[0], max_new_tokens=6)))
        registry, base_name = service.metrics.registry, service.checkpoint.name

    def sample(name: str, **labels) -> float | None:
        return registry.get_sample_value(name, labels)

    assert (len(plain.token_ids), len(plain2.token_ids), len(base.token_ids)) == (3, 4, 6)
    assert sample("internvl_llm_generated_tokens_total", model="q-plain") == 7
    assert sample("internvl_llm_generated_tokens_total", model=base_name) == 6
    assert not sample("internvl_llm_generated_tokens_total", model="q-rslora")
    assert sample("internvl_llm_prompt_tokens_total", model="q-plain") == (
        plain.finish.usage.prompt_tokens + plain2.finish.usage.prompt_tokens)
    assert sample("internvl_llm_finished_requests_total", finish_reason="length", model="q-plain") == 2
    assert sample("internvl_llm_finished_requests_total", finish_reason="length", model=base_name) == 1


async def test_model_info_lists_the_adapters(world):
    w = world("qwen2")
    checkpoint = open_checkpoint(w.directory)
    names = list(ADAPTERS["qwen2"])
    expected = tuple(read_adapter(name, w.adapters[name][0], checkpoint, max_rank=64).info() for name in names)
    assert [(a.name, a.touches_vision, a.rank) for a in expected] == [
        ("q-plain", False, 8), ("q-rslora", False, 4), ("q-vision", True, 8)]
    assert len({a.digest for a in expected}) == 3
    async with serving(w, *names) as service:
        info = service.model_info()
        response = await LLMServicer(service).GetModelInfo(llm_pb2.GetModelInfoRequest(), None)
    assert info.adapters == expected
    assert info.fingerprint == checkpoint.fingerprint
    assert ModelInfo.from_pb(response.model_info) == info
    assert [AdapterInfo.from_pb(a) for a in response.model_info.adapters] == list(expected)
    for adapter in expected:
        assert f"{adapter.name}={adapter.digest}" in info.serving_identity
