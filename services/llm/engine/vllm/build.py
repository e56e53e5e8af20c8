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
| a request's priority (critical 1 < standard 2 < sheddable 3) | `scheduling_policy="priority"` and each request's `priority` (vLLM's convention too: lower first; FIFO within one; under KV pressure vLLM preempts the least important running request rather than the newest) |
| `--tensor-parallel-size`, `--pipeline-parallel-size` | `tensor_parallel_size`, `pipeline_parallel_size` |
| `--lora NAME=DIR` (each adapter's language part: services.llm.engine.vllm.adapters) | `enable_lora`; `max_loras` and `max_cpu_loras` the adapters with a language part (all resident, any mix in one batch; one more on a CPU: `lora_slots`), `max_lora_rank` the smallest vLLM rank that holds the largest (the flags `--max-loras` and `--max-lora-rank` bound them when the adapters are read) |

On a CPU, whole prompts: chunked prefill off, and `max_num_batched_tokens` at least the context. vLLM's CPU runner
cannot rewind a seeded request's random generator after the draw it discards for a partial prefill (it calls
`set_offset`, which only CUDA generators have): with chunks, a seeded request whose prompt outgrew one step killed
the engine core ("CPU Generator does not use offset"), and every request in flight with it.

Always: eager mode on a CPU (compiling takes minutes there; on a GPU vLLM's own default, compiled with CUDA graphs),
image embeddings in (`enable_mm_embeds`; the vision tower's profiling skipped: it never runs), raw log-softmax
log-probabilities, the checkpoint's generation_config.json ignored (the original ignores it too: it stops at
`<|im_end|>`), vLLM's own stat loggers off (ours reads its statistics), structured outputs by xgrammar only (the
backend the plugin makes ours; vLLM's "auto" would fall back to another backend for a grammar xgrammar refuses).
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
from services.llm.engine.vllm.adapters import check_adapters, lora_rank
from services.llm.engine.vllm.engine import VLLMEngine
from services.llm.engine.vllm.plugin import TOKENIZER_MODE
from services.llm.prompt import PromptBuilder
from services.model.adapters import LANGUAGE_PREFIXES, Adapter
from services.model.checkpoint import Checkpoint
from services.model.modules import default_device, resolve_dtype
from services.model.torch_dtypes import TORCH_DTYPES


def build_vllm_engine(config: LLMConfig, checkpoint: Checkpoint, tokenizer: PreTrainedTokenizerBase,
                      prompts: PromptBuilder, max_context_tokens: int, *, adapters: Sequence[Adapter] = (),
                      model: object | None = None) -> VLLMEngine:
    """The vLLM engine over `checkpoint` (not started: `await engine.start()` starts vLLM's processes)."""
    check_adapters(adapters)
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
    args = engine_args(config, checkpoint, max_context_tokens, dtype, device, adapters)
    return VLLMEngine(args, tokenizer, stop_token_id=tokenizer.convert_tokens_to_ids(template.STOP_TOKEN),
                      img_start_id=prompts.img_start_id, img_context_id=prompts.img_context_id,
                      img_end_id=prompts.img_end_id, dtype=dtype, adapters=adapters)


def engine_args(config: LLMConfig, checkpoint: Checkpoint, max_context_tokens: int, dtype: torch.dtype,
                device: torch.device, adapters: Sequence[Adapter] = ()):
    """vLLM's AsyncEngineArgs for our configuration (the table in the module doc)."""
    from vllm.config import StructuredOutputsConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    language = [adapter for adapter in adapters if adapter.part(LANGUAGE_PREFIXES)]
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
        enable_prefix_caching=config.kv_cache_budget_bytes > 0,
        kv_cache_memory_bytes=kv_cache_bytes(config, device),
        enforce_eager=device.type == "cpu",
        enable_mm_embeds=True,
        skip_mm_profiling=True,
        max_logprobs=SamplingParams.MAX_TOP_LOGPROBS,
        logprobs_mode="raw_logprobs",
        disable_log_stats=True,
        enable_logging_iteration_details=True,
        structured_outputs_config=StructuredOutputsConfig(backend="xgrammar"),
        tensor_parallel_size=config.tensor_parallel_size,
        pipeline_parallel_size=config.pipeline_parallel_size,
        enable_lora=bool(language),
        max_loras=lora_slots(language, device),
        max_cpu_loras=lora_slots(language, device),
        max_lora_rank=lora_rank(language),
        # Waiting requests by their priority (EngineRequest.priority), then arrival, as our engine's queue.
        scheduling_policy="priority",
    )


def lora_slots(adapters: Sequence[Adapter], device: torch.device) -> int:
    """vLLM's `max_loras`: a slot for every adapter (all resident), and on a CPU one more that stays empty. vLLM's CPU
    LoRA kernels (plain torch) index the stacked adapters with each row's slot, and a row without an adapter has slot
    -1, which torch reads as the last slot: with every slot holding an adapter, the base's rows in a batch with
    adapted rows were computed with the last adapter (measured: the base's tokens changed). An empty last slot adds
    exactly zero to them. (vLLM's GPU kernels skip slot -1.)"""
    return max(1, len(adapters)) + (device.type == "cpu")


def kv_cache_bytes(config: LLMConfig, device: torch.device) -> int | None:
    """vLLM's KV pool: our two budgets together (None: vLLM's own sizing, on a GPU without a budget)."""
    if config.kv_budget_bytes:
        return config.kv_budget_bytes + config.kv_cache_budget_bytes
    if device.type == "cuda":
        return None
    return int(free_memory_bytes(device) * DEFAULT_KV_SHARE)
