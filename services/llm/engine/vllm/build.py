"""`build_vllm_engine`: the vLLM engine for the LLM service's configuration (the engine factory's `vllm`, `--engine vllm`).

How our configuration maps onto vLLM's engine arguments:

| ours | vLLM |
|---|---|
| `--model` (the checkpoint directory, original format) | `model`, read through our configuration classes (the plugin), `trust_remote_code` off |
| the checkpoint's tokenizer | `tokenizer_mode` of the plugin: loaded as the LLM service loads it |
| `--dtype` (default float32 on CPU, bfloat16 on a GPU) | `dtype` |
| `--device` | the platform: `VLLM_TARGET_DEVICE=cpu` when no GPU is used; a GPU index is refused (vLLM takes the visible GPUs: set `CUDA_VISIBLE_DEVICES`) |
| `--max-batch-size` | `max_num_seqs` |
| `--max-step-tokens` | `max_num_batched_tokens`, with chunked prefill (on a GPU; on a CPU, see below) |
| `--max-context-tokens` (prompt + answer) | `max_model_len` |
| `--kv-budget-mb` + `--kv-cache-budget-mb` (running KV and the prefix cache: one paged pool in vLLM) | `kv_cache_memory_bytes`; with `--kv-budget-mb 0`, 80% of the free memory on a CPU, vLLM's own `gpu_memory_utilization` on a GPU |
| `--kv-cache-budget-mb 0` (prefix cache off) | `enable_prefix_caching=False` |
| `--max-queue` | the service's bound (services.llm.intake), on vLLM's waiting requests |
| `--tensor-parallel-size` | `tensor_parallel_size`: the GPUs (of the visible ones) one replica shards its model over |

On a CPU, whole prompts: chunked prefill off, and `max_num_batched_tokens` at least the context. vLLM's CPU runner
cannot rewind a seeded request's random generator after the draw it discards for a partial prefill (it calls
`set_offset`, which only CUDA generators have): with chunks, a seeded request whose prompt outgrew one step killed
the engine core ("CPU Generator does not use offset"), and every request in flight with it.

Always: eager mode on a CPU (compiling takes minutes there), image embeddings in (`enable_mm_embeds`; the vision
tower's profiling skipped: it never runs), raw log-softmax log-probabilities, the checkpoint's
generation_config.json ignored (the original ignores it too: it stops at `<|im_end|>`), vLLM's own stat loggers off
(ours reads its statistics).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from services.contract import template
from services.contract.errors import InvalidArgumentError
from services.contract.sampling import SamplingParams
from services.llm.config import LLMConfig
from services.llm.engine.memory import DEFAULT_KV_SHARE, free_memory_bytes
from services.llm.engine.vllm.engine import VLLMEngine
from services.llm.engine.vllm.plugin import TOKENIZER_MODE
from services.llm.prompt import PromptBuilder
from services.model.adapters import Adapter
from services.model.checkpoint import Checkpoint
from services.model.modules import default_device, resolve_dtype
from services.model.torch_dtypes import TORCH_DTYPES


def build_vllm_engine(config: LLMConfig, checkpoint: Checkpoint, tokenizer: PreTrainedTokenizerBase,
                      prompts: PromptBuilder, max_context_tokens: int, *, adapters: Sequence[Adapter] = (),
                      model: object | None = None) -> VLLMEngine:
    """The vLLM engine over `checkpoint` (not started: `await engine.start()` starts vLLM's processes)."""
    if adapters:
        raise InvalidArgumentError("--lora: LoRA adapters are not served by the vLLM engine yet")
    if model is not None:
        raise InvalidArgumentError("the vLLM engine loads its own weights; it cannot compute with a model loaded here")
    device = torch.device(config.device) if config.device else default_device()
    if device.type == "cuda" and device.index not in (None, 0):
        raise InvalidArgumentError(f"--device {config.device}: the vLLM engine uses the visible GPUs; choose them "
                                   "with CUDA_VISIBLE_DEVICES")
    if device.type not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"--device {config.device}: the vLLM engine runs on a CPU or CUDA GPUs")
    if device.type == "cpu":
        # vLLM picks its platform (and its kernels) once, from this, when first asked: before any engine exists.
        os.environ["VLLM_TARGET_DEVICE"] = "cpu"
    dtype = resolve_dtype(config.dtype, device)
    return VLLMEngine(engine_args(config, checkpoint, max_context_tokens, dtype, device), tokenizer,
                      stop_token_id=tokenizer.convert_tokens_to_ids(template.STOP_TOKEN),
                      img_start_id=prompts.img_start_id, img_context_id=prompts.img_context_id,
                      img_end_id=prompts.img_end_id, dtype=dtype)


def engine_args(config: LLMConfig, checkpoint: Checkpoint, max_context_tokens: int, dtype: torch.dtype,
                device: torch.device):
    """vLLM's AsyncEngineArgs for our configuration (the table in the module doc)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    chunked = device.type != "cpu"
    return AsyncEngineArgs(
        model=str(checkpoint.path),
        served_model_name=checkpoint.name,
        tokenizer_mode=TOKENIZER_MODE,
        trust_remote_code=False,
        generation_config="vllm",
        dtype=next(name for name, value in TORCH_DTYPES.items() if value == dtype),
        max_model_len=max_context_tokens,
        max_num_seqs=config.max_batch_size,
        # On a CPU, no partial prefills (module doc).
        max_num_batched_tokens=config.max_step_tokens if chunked else max(config.max_step_tokens, max_context_tokens),
        enable_chunked_prefill=chunked,
        tensor_parallel_size=config.tensor_parallel_size,
        enable_prefix_caching=config.kv_cache_budget_bytes > 0,
        kv_cache_memory_bytes=kv_cache_bytes(config, device),
        enforce_eager=device.type == "cpu",
        enable_mm_embeds=True,
        skip_mm_profiling=True,
        max_logprobs=SamplingParams.MAX_TOP_LOGPROBS,
        logprobs_mode="raw_logprobs",
        disable_log_stats=True,
        enable_logging_iteration_details=True,
    )


def kv_cache_bytes(config: LLMConfig, device: torch.device) -> int | None:
    """vLLM's KV pool: our two budgets together (None: vLLM's own sizing, on a GPU without a budget)."""
    if config.kv_budget_bytes:
        return config.kv_budget_bytes + config.kv_cache_budget_bytes
    if device.type == "cuda":
        return None
    return int(free_memory_bytes(device) * DEFAULT_KV_SHARE)
