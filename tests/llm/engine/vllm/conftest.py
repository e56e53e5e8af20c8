"""A started vLLM engine per language-model family, with its independent references.

`family` (session scope, one per family: an engine start costs tens of seconds, so every module's tests share it; a
test that kills its engine core waits for the engine's restart):
- `qwen2`: make-tiny's `small` preset (LLM head size 32, the smallest vLLM's CPU attention runs), Qwen2 BPE tokenizer;
- `internlm2`: the same shape as InternLM2 with the published sizes' tokenizer path (a sentencepiece model and a
  tokenizer class of the checkpoint's own, tests/sentencepiece_checkpoint.py), whose other code files are tripwires.
Each engine serves the LoRA adapters of `ADAPTERS` beside the base, written with PEFT by tests/lora_reference.py.

The references share no code with the engine: transformers' native `InternVLForConditionalGeneration` (weights
converted by tests/reference_impl.py) generating from the prompt's ids and the images' pixels, the project's vision
path (checked against that same native model elsewhere) making the embeddings the engine is given, as the vision
service would, and for the adapters PEFT's own LoRA layers on the original module tree (`Family.original`).

`--vllm-device` and `--vllm-dtype` (tests/conftest.py) run them elsewhere: bench/gpu_check.py runs them on a GPU,
in bfloat16 and in float32; the references then run on that GPU in float32.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
import torch
import transformers.dynamic_module_utils
from helpers.native import load_native, native_greedy, small_checkpoint
from lora_reference import (
    INTERNLM2_TARGETS,
    QWEN2_TARGETS,
    VISION_AND_LANGUAGE_TARGETS,
    OriginalInternVL,
    unwrap,
    write_swift_adapter,
)
from transformers import InternVLForConditionalGeneration

from services.contract import template
from services.contract.conversation import Conversation
from services.contract.sampling import SamplingParams
from services.llm.config import LLMConfig
from services.llm.engine.events import EngineRequest, Finish, TokenDelta
from services.llm.engine.vllm.build import build_vllm_engine
from services.llm.metrics import LLMMetrics
from services.llm.prompt import Prompt, PromptBuilder
from services.model.adapter_options import AdapterOptions
from services.model.adapters import read_adapters
from services.model.chat import InternVLChat
from services.vision.preprocess import load_image

# KV pool of the test engines (running and prefix cache together), in MiB: a few thousand tokens of the small shape.
KV_MB = 32
CONTEXT = 4096

# Qwen2's projections and its LM head (vLLM takes LoRA on a head only through services.llm.engine.vllm.lora_heads).
QWEN2_AND_HEAD_TARGETS = QWEN2_TARGETS.replace("down_proj))$", "down_proj|lm_head))$")
# The adapters each engine serves: ranks differ (vLLM pads them), one uses rsLoRA, one also adapts the vision side
# (the engine must load only its language part), InternLM2's adapt the fused `wqkv` and the head `output`.
ADAPTERS = {
    "qwen2": {
        "q-plain": {"target_modules": QWEN2_AND_HEAD_TARGETS, "r": 8, "lora_alpha": 32, "seed": 1},
        "q-rslora": {"target_modules": QWEN2_TARGETS, "r": 4, "lora_alpha": 16, "use_rslora": True, "seed": 2},
        "q-vision": {"target_modules": VISION_AND_LANGUAGE_TARGETS, "r": 8, "lora_alpha": 32, "seed": 3},
    },
    "internlm2": {
        "i-plain": {"target_modules": INTERNLM2_TARGETS, "r": 8, "lora_alpha": 32, "seed": 1},
        "i-rslora": {"target_modules": INTERNLM2_TARGETS, "r": 16, "lora_alpha": 32, "use_rslora": True, "seed": 2},
    },
}


@dataclass
class Answer:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    deltas: list[str] = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    finish: Finish | None = None


async def _collect(stream) -> list[Answer]:
    answers: dict[int, Answer] = {}
    async for event in stream:
        answer = answers.setdefault(event.index, Answer())
        if isinstance(event, TokenDelta):
            answer.token_ids += event.token_ids
            answer.text += event.text
            answer.deltas.append(event.text)
            answer.top_logprobs += event.top_logprobs
        else:
            answer.finish = event
    return [answers[i] for i in sorted(answers)]


@dataclass
class Family:
    name: str
    path: Path
    chat: InternVLChat  # the project's reference path: its vision tower makes the engine's embeddings
    native: InternVLForConditionalGeneration
    engine: object
    prompts: PromptBuilder
    metrics: LLMMetrics
    pixels: dict[str, torch.Tensor]  # image name -> tiles [n, 3, 448, 448]
    original: OriginalInternVL  # the checkpoint as a module tree of its original names, for PEFT
    adapters: dict[str, tuple[Path, object]]  # adapter name -> (its ms-swift directory, the PEFT model it was saved from)
    adapter_files: dict[str, dict[str, tuple[int, int]]]  # adapter name -> its files' (size, mtime) as written

    def adapted(self, name: str) -> OriginalInternVL:
        """The module whose forwards are model `name`'s ("": the base), adapted by PEFT's own LoRA layers."""
        return unwrap(self.adapters[name][1]) if name else self.original

    @property
    def stop_id(self) -> int:
        return self.chat.stop_id

    @property
    def dtype(self) -> torch.dtype:
        """The engine's compute dtype."""
        return self.engine.dtype

    def rows(self, name: str) -> torch.Tensor:
        """What the vision service would store for image `name`: [tiles * 256, hidden], on the CPU (as read from
        Redis)."""
        with torch.inference_mode():
            rows = self.chat.vision.encode(self.pixels[name])
            return rows.reshape(-1, self.native.config.text_config.hidden_size).cpu()

    def request(self, conversation: Conversation, images: Sequence[str] = (), adapter: str = "",
                **sampling) -> EngineRequest:
        """`images`: the pixel names of the prompt's images in order (their ImageRef keys name them too)."""
        sampling.setdefault("max_new_tokens", 10)
        prompt = self.prompts.build(conversation)
        rows = tuple(torch.cat([self.rows(n) for n in name.split("+")]) for name in images)
        return EngineRequest(prompt, SamplingParams(**sampling), sampling["max_new_tokens"], rows, adapter=adapter)

    @staticmethod
    async def collect(stream) -> list[Answer]:
        """Every event of a stream, by answer index."""
        return await _collect(stream)

    async def run(self, conversation: Conversation, images: Sequence[str] = (), **sampling) -> list[Answer]:
        return await _collect(self.engine.submit(self.request(conversation, images, **sampling)))

    def reference(self, prompt: Prompt, images: Sequence[str], max_new_tokens: int, **generate_kwargs):
        """transformers' own greedy generation from our prompt's ids and the images' pixels: (token ids, raw logits
        of each step [steps, vocab])."""
        pixels = torch.cat([self.pixels[n] for name in images for n in name.split("+")]) if images else None
        return native_greedy(self.native, prompt.token_ids, pixels, max_new_tokens, self.stop_id,
                             self.chat.tokenizer.pad_token_id, **generate_kwargs)


@pytest_asyncio.fixture(scope="session", loop_scope="session", params=["qwen2", "internlm2"])
async def family(request, tmp_path_factory, golden_dir):
    root = tmp_path_factory.mktemp(f"vllm-{request.param}")
    with contextlib.ExitStack() as stack:
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        # Remote tokenizer code is copied into the modules cache and imported from there: a private cache, for this
        # process and for the processes vLLM spawns (they read the variable when they import transformers).
        patch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(root / "hf-modules"))
        patch.setenv("HF_MODULES_CACHE", str(root / "hf-modules"))
        path, _ = small_checkpoint(request.param, root)
        device, dtype = request.config.getoption("--vllm-device"), request.config.getoption("--vllm-dtype")
        chat = InternVLChat.load(str(path), dtype="float32", device=device)
        original = OriginalInternVL(path)
        adapters = {name: write_swift_adapter(original, root / f"lora-{name}", **spec)
                    for name, spec in ADAPTERS[request.param].items()}
        written = {name: {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir()}
                   for name, (directory, _) in adapters.items()}
        options = AdapterOptions(loras=tuple((name, str(directory)) for name, (directory, _) in adapters.items()))
        config = LLMConfig(model=str(path), dtype=dtype, device=device, kv_budget_mb=KV_MB / 2,
                           kv_cache_budget_mb=KV_MB / 2, max_context_tokens=CONTEXT, adapters=options,
                           engine="vllm")
        prompts = PromptBuilder(chat.tokenizer, chat.tokens_per_tile, chat.checkpoint.spec.system_message, CONTEXT)
        engine = build_vllm_engine(config, chat.checkpoint, chat.tokenizer, prompts, CONTEXT,
                                   adapters=read_adapters(options, chat.checkpoint))
        metrics = LLMMetrics()
        engine.observer = metrics
        await engine.start()
        print(f"\n{request.param}: vLLM engine started in {engine.start_seconds:.1f} s")
        try:
            pixels = {"small": load_image(golden_dir / "small_120x90.png", max_num=1),
                      "wide": load_image(golden_dir / "wide_2200x300.png", max_num=2),
                      "portrait": load_image(golden_dir / "portrait_333x1200.png", max_num=1),
                      "landscape": load_image(golden_dir / "landscape_1000x700.png", max_num=1)}
            yield Family(request.param, path, chat, load_native(path, chat.img_context_id, device=device), engine,
                         prompts, metrics, pixels, original, adapters, written)
        finally:
            await engine.close()
        if request.param == "internlm2":
            assert not (root / "imported.txt").exists(), "a checkpoint code file other than the tokenizer's ran"
        if device == "cpu":
            assert os.environ.get("VLLM_TARGET_DEVICE") == "cpu"
        assert template.STOP_TOKEN == "<|im_end|>"
