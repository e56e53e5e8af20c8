"""The LLM service's one configuration object, built once by the CLI (`internvl-serve llm ...`) and passed down."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.contract.dtypes import DTYPE_NAMES
from services.contract.errors import InvalidArgumentError
from services.model.adapter_options import AdapterOptions, add_adapter_options
from services.runtime.grpc_server import ServerOptions, add_server_options
from services.runtime.redis_client import redis_url_problem

SERVICE_NAME = "internvl.llm.v1.LLMService"


@dataclass(frozen=True)
class LLMConfig:
    """Everything the LLM service reads at start-up. Frozen: nothing changes it after the CLI built it."""

    model: str
    server: ServerOptions = field(default_factory=lambda: ServerOptions(port=0))
    # Shared embedding cache; None: every request must send its embeddings inline.
    redis_url: str | None = None
    # Compute dtype name (float32 | bfloat16 | float16); None: bfloat16 on a GPU, float32 on CPU.
    dtype: str | None = None
    # torch device ("cuda", "cuda:1", "cpu"); None: the first GPU if there is one.
    device: str | None = None
    # Sequences decoded together in one forward (prefilling one included).
    max_batch_size: int = 32
    # Requests admitted but not yet running; one more is answered RESOURCE_EXHAUSTED.
    max_queue: int = 256
    # Memory the prefix KV cache of finished turns may hold; 0 disables it.
    kv_cache_budget_mb: float = 1024.0
    # Memory admission may promise to running sequences' KV (prompt + max_new_tokens each, in the padded batch);
    # 0: 80% of the device's free memory at start, less the prefix cache's budget.
    kv_budget_mb: float = 0.0
    # Tokens one scheduler step feeds (each decoding sequence counts one; the rest is shared by the prompts being
    # prefilled), so a long prompt neither stalls running streams nor the prompts queued behind it.
    max_step_tokens: int = 512
    # max_new_tokens of a request that leaves it 0.
    max_new_tokens_default: int = 512
    # Longest prompt + answer in tokens; None: the language model's max_position_embeddings.
    max_context_tokens: int | None = None
    # LoRA adapters served beside the base (--lora NAME=DIR, --max-loras, --max-lora-rank).
    adapters: AdapterOptions = field(default_factory=AdapterOptions)
    # The engine that computes the tokens, by its name in services.llm.engine.factory.ENGINES (no flag yet).
    engine: str = "transformers"

    def __post_init__(self) -> None:
        """Refuses a value no server could run with, naming its flag (the CLI prints it as one usage line)."""
        checks = [(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
                  for name in ("max_batch_size", "max_queue", "max_step_tokens", "max_new_tokens_default")]
        url_problem = redis_url_problem(self.redis_url)
        checks += [
            (url_problem is None, f"--redis-url: {url_problem}"),
            (self.kv_cache_budget_mb >= 0, f"--kv-cache-budget-mb must be >= 0, got {self.kv_cache_budget_mb}"),
            (self.kv_budget_mb >= 0, f"--kv-budget-mb must be >= 0 (0: from the free memory), got {self.kv_budget_mb}"),
            (self.max_context_tokens is None or self.max_context_tokens >= 2,
             f"--max-context-tokens must be >= 2, got {self.max_context_tokens}"),
        ]
        checks += [(False, problem) for problem in self.adapters.problems()]
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
        environ = os.environ if environ is None else environ
        return cls(
            model=args.model,
            server=ServerOptions.from_args(args, environ),
            redis_url=args.redis_url,
            dtype=args.dtype,
            device=args.device,
            max_batch_size=args.max_batch_size,
            max_queue=args.max_queue,
            kv_cache_budget_mb=args.kv_cache_budget_mb,
            kv_budget_mb=args.kv_budget_mb,
            max_step_tokens=args.max_step_tokens,
            max_new_tokens_default=args.max_new_tokens_default,
            max_context_tokens=args.max_context_tokens,
            adapters=AdapterOptions.from_args(args),
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = LLMConfig(model="")
    parser.add_argument("--model", required=True, help="checkpoint directory (original OpenGVLab format) or hub id")
    add_server_options(parser, default_port=50053)
    parser.add_argument("--redis-url", default=None,
                        help="shared embedding cache, e.g. redis://redis:6379/0, or a Redis Cluster by some of its nodes: "
                             "redis+cluster://redis-0:6379,redis-1:6379 (default: inline embeddings only)")
    parser.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                        help="compute dtype (default: bfloat16 on a GPU, float32 on CPU)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                        help="sequences decoded together per step")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue,
                        help="waiting requests before RESOURCE_EXHAUSTED")
    parser.add_argument("--kv-cache-budget-mb", type=float, default=defaults.kv_cache_budget_mb,
                        help="memory for the prefix KV cache of finished turns (0: off)")
    parser.add_argument("--kv-budget-mb", type=float, default=defaults.kv_budget_mb,
                        help="memory admission may promise to running sequences' KV (default 0: 80%% of the free "
                             "memory at start, less --kv-cache-budget-mb)")
    parser.add_argument("--max-step-tokens", type=int, default=defaults.max_step_tokens,
                        help="tokens per scheduler step: one per decoding sequence, the rest shared by prefills")
    parser.add_argument("--max-new-tokens-default", type=int, default=defaults.max_new_tokens_default,
                        help="max_new_tokens when a request leaves it 0")
    parser.add_argument("--max-context-tokens", type=int, default=None,
                        help="prompt + answer limit (default: the model's max_position_embeddings)")
    add_adapter_options(parser)
