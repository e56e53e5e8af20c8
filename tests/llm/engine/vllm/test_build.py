"""`--engine vllm`: the factory builds the vLLM engine (not started: no process here), our flags become vLLM's
engine arguments (LoRA, parallelism, structured outputs among them), and what it cannot do is refused naming the
flag."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from services.contract.errors import InvalidArgumentError
from services.llm.config import LLMConfig
from services.llm.engine.factory import build_engine
from services.llm.engine.vllm.engine import VLLMEngine
from services.llm.engine.vllm.plugin import TOKENIZER_MODE
from services.llm.prompt import PromptBuilder
from services.model.adapters import Adapter
from services.model.checkpoint import open_checkpoint
from services.model.modules import load_tokenizer

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return open_checkpoint(tiny_checkpoint())


def build(checkpoint, **overrides):
    config = LLMConfig(model=str(checkpoint.path), engine="vllm", **{"device": "cpu", **overrides})
    tokenizer = load_tokenizer(checkpoint)
    prompts = PromptBuilder(tokenizer, 256, None, 2048)
    return build_engine(config, checkpoint, tokenizer, prompts, 2048)


def test_the_factory_builds_the_vllm_engine_from_our_flags(checkpoint, monkeypatch):
    monkeypatch.delenv("VLLM_TARGET_DEVICE", raising=False)
    engine = build(checkpoint, max_batch_size=6, max_step_tokens=640, kv_budget_mb=48, kv_cache_budget_mb=16)
    assert isinstance(engine, VLLMEngine) and engine.llm is None  # built, not started
    args = engine.engine_args
    # On a CPU whole prompts, never a partial prefill: a step holds at least the context (build.py's module doc).
    assert (args.model, args.max_num_seqs, args.max_num_batched_tokens, args.max_model_len) == (
        str(checkpoint.path), 6, 2048, 2048)
    assert args.kv_cache_memory_bytes == 64 * MIB  # the running KV and the prefix cache: one pool in vLLM
    assert args.enable_prefix_caching and not args.enable_chunked_prefill and args.enforce_eager
    assert args.tensor_parallel_size == 1
    assert (args.tokenizer_mode, args.trust_remote_code, args.generation_config) == (TOKENIZER_MODE, False, "vllm")
    assert args.enable_mm_embeds and args.logprobs_mode == "raw_logprobs" and args.max_logprobs == 20
    assert args.dtype == "float32" and str(engine.dtype) == "torch.float32"
    assert os.environ["VLLM_TARGET_DEVICE"] == "cpu"
    assert engine.image_ids == (151665, 151667, 151666) and engine.stop_token_id == 151645
    assert args.scheduling_policy == "priority"  # each request's priority orders vLLM's waiting queue


def test_on_a_gpu_prompts_are_prefilled_in_chunks_of_the_step_and_sharded_over_the_gpus(checkpoint, monkeypatch):
    """The arguments for a GPU (built here without one: nothing of vLLM starts)."""
    monkeypatch.delenv("VLLM_TARGET_DEVICE", raising=False)
    args = build(checkpoint, device="cuda", max_step_tokens=640, tensor_parallel_size=4).engine_args
    assert (args.max_num_batched_tokens, args.enable_chunked_prefill, args.tensor_parallel_size) == (640, True, 4)
    assert not args.enforce_eager and args.dtype == "bfloat16"
    assert args.kv_cache_memory_bytes is None  # vLLM's own share of the GPU's memory
    assert "VLLM_TARGET_DEVICE" not in os.environ


def test_tensor_parallelism_needs_the_vllm_engine(checkpoint):
    with pytest.raises(InvalidArgumentError, match="--tensor-parallel-size 2 needs --engine vllm"):
        LLMConfig(model=str(checkpoint.path), tensor_parallel_size=2)
    with pytest.raises(InvalidArgumentError, match="--tensor-parallel-size must be >= 1"):
        LLMConfig(model=str(checkpoint.path), engine="vllm", tensor_parallel_size=0)


def test_no_prefix_cache_budget_turns_vllms_prefix_caching_off(checkpoint):
    args = build(checkpoint, kv_budget_mb=32, kv_cache_budget_mb=0).engine_args
    assert not args.enable_prefix_caching and args.kv_cache_memory_bytes == 32 * MIB


def test_what_the_vllm_engine_cannot_do_is_refused(checkpoint):
    with pytest.raises(InvalidArgumentError, match="--device cuda:1"):
        build(checkpoint, device="cuda:1")
    config = LLMConfig(model=str(checkpoint.path), engine="vllm", device="cpu")
    tokenizer = load_tokenizer(checkpoint)
    prompts = PromptBuilder(tokenizer, 256, None, 2048)
    with pytest.raises(InvalidArgumentError, match="weights"):
        build_engine(config, checkpoint, tokenizer, prompts, 2048, model=object())
    with pytest.raises(InvalidArgumentError, match="--lora big: rank 1024"):
        build_engine(config, checkpoint, tokenizer, prompts, 2048, adapters=[adapter("big", 1024)])


def adapter(name: str, rank: int, language: bool = True) -> Adapter:
    module = "language_model.model.layers.0.mlp.up_proj" if language else "mlp1.1"
    return Adapter(name, Path("."), rank, 16.0, False, {module: (torch.zeros(rank, 8), torch.zeros(8, rank))}, name)


def test_lora_parallelism_and_structured_outputs_reach_vllms_arguments(checkpoint):
    args = build(checkpoint).engine_args
    assert not args.enable_lora and (args.tensor_parallel_size, args.pipeline_parallel_size) == (1, 1)
    assert args.structured_outputs_config.backend == "xgrammar"  # no silent fallback to another backend
    config = LLMConfig(model=str(checkpoint.path), engine="vllm", device="cpu", tensor_parallel_size=4,
                       pipeline_parallel_size=2)
    tokenizer = load_tokenizer(checkpoint)
    adapters = [adapter("a", 4), adapter("b", 12), adapter("vision-only", 64, language=False)]
    engine = build_engine(config, checkpoint, tokenizer, PromptBuilder(tokenizer, 256, None, 2048), 2048,
                          adapters=adapters)
    args = engine.engine_args
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (4, 2)
    # Two adapters with a language part, and on a CPU one slot more that stays empty (build.lora_slots).
    assert (args.enable_lora, args.max_loras, args.max_cpu_loras, args.max_lora_rank) == (True, 3, 3, 16)
    assert [adapter.name for adapter in engine.keeper.adapters] == ["a", "b", "vision-only"]


def test_parallel_sizes_need_the_vllm_engine(checkpoint):
    with pytest.raises(InvalidArgumentError, match="--tensor-parallel-size 2 needs --engine vllm"):
        LLMConfig(model=str(checkpoint.path), tensor_parallel_size=2)
    with pytest.raises(InvalidArgumentError, match="--pipeline-parallel-size 3 needs --engine vllm"):
        LLMConfig(model=str(checkpoint.path), pipeline_parallel_size=3)
    with pytest.raises(InvalidArgumentError, match="--tensor-parallel-size must be >= 1, got 0"):
        LLMConfig(model=str(checkpoint.path), engine="vllm", tensor_parallel_size=0)
