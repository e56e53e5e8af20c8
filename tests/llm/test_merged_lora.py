"""`merge-lora`'s checkpoint serves what the adapter serves.

A PEFT-built adapter in ms-swift's layout (InternLM2's every linear layer, `wqkv` and `output` included; and Qwen2's
seven projections with rslora) is served two ways by the LLM service: as an adapter on the base (the per-row LoRA
path) and as the base model of the checkpoint `internvl-serve merge-lora` wrote. Greedy tokens are equal and each
position's top-5 log-probabilities agree within 1e-4 (float32), for the same prompts. The base is stored in float32
here: the tiny checkpoints store bfloat16, and a merged weight rounded back to bfloat16 (as the original format and
`swift export` store it) moves logprobs by ~1e-3, which would hide a wrong merge at this tolerance. (The merged weights
themselves are checked against W + scale B A computed from the files in tests/tools/test_merge_lora.py.)
"""

from __future__ import annotations

import contextlib
import shutil

import pytest
import torch
from helpers.engine import ask
from lora_reference import INTERNLM2_TARGETS, QWEN2_TARGETS, OriginalInternVL, write_swift_adapter
from safetensors.torch import load_file, save_file

from services.llm.config import LLMConfig
from services.llm.service import LLMService
from services.model.adapters import read_adapter
from services.model.checkpoint import open_checkpoint
from services.model.modules import load_language_model, load_tokenizer
from tools.merge_lora import merge_lora

pytestmark = [pytest.mark.timeout(300)]

PROMPTS = ("Write the formula of the area of a circle.", "Transcribe: \\frac{a}{b}")
MAX_NEW = 10


@contextlib.asynccontextmanager
async def serving(path, adapter_dir=None):
    """A started in-process LLM service on the checkpoint at `path` (float32, CPU), with the adapter as "ft"."""
    checkpoint = open_checkpoint(path)
    adapters = [read_adapter("ft", adapter_dir, checkpoint, max_rank=64)] if adapter_dir else []
    config = LLMConfig(model=str(path), dtype="float32", device="cpu")
    model = load_language_model(checkpoint, torch.float32, "cpu")
    service = LLMService.with_model(config, checkpoint, model, load_tokenizer(checkpoint), adapters=adapters)
    await service.start()
    try:
        yield service
    finally:
        await service.close()


async def answers(service: LLMService, adapter: str, collect) -> list:
    results = []
    for prompt in PROMPTS:
        request = ask(prompt, adapter=adapter, max_new_tokens=MAX_NEW, top_logprobs=5)
        results.append(await collect(await service.generate(request)))
    return results


@pytest.mark.asyncio
@pytest.mark.parametrize(("llm", "targets", "rslora"), [("internlm2", INTERNLM2_TARGETS, False),
                                                       ("qwen2", QWEN2_TARGETS, True)])
async def test_the_merged_checkpoint_serves_the_adapters_tokens(tiny_checkpoint, tmp_path, collect, llm, targets,
                                                                rslora):
    base_dir = tmp_path / "base"
    shutil.copytree(tiny_checkpoint(llm=llm), base_dir)
    weights = base_dir / "model.safetensors"
    save_file({k: v.float() for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    adapter_dir, _ = write_swift_adapter(OriginalInternVL(base_dir), tmp_path / "adapter", target_modules=targets,
                                         r=8, lora_alpha=32, use_rslora=rslora, seed=3, std=0.05)
    merged_dir = merge_lora(str(base_dir), adapter_dir, tmp_path / "merged")
    async with serving(base_dir, adapter_dir) as service:
        adapted = await answers(service, "ft", collect)
        base = await answers(service, "", collect)
    async with serving(merged_dir) as service:
        merged = await answers(service, "", collect)
    for got, want in zip(merged, adapted, strict=True):
        assert got.token_ids == want.token_ids
        for a, b in zip(got.top_logprobs, want.top_logprobs, strict=True):
            assert a.token_ids == b.token_ids
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4
    # The adapter changes the answers (or the comparison above would hold for a no-op merge as well).
    assert [r.token_ids for r in adapted] != [r.token_ids for r in base]
