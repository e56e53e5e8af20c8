"""The vision service's settings: one frozen object, built once from the command line and passed down.

Environment variables are read here and nowhere else, and only when ``from_args`` is called (never at import
time): ``INTERNVL_REDIS_URL`` supplies ``--redis-url`` when the flag is absent.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.contract.cache_keys import DEFAULT_NAMESPACE
from services.contract.dtypes import DTYPE_NAMES
from services.contract.errors import InvalidArgumentError
from services.contract.tiling import DEFAULT_MAX_PIXELS
from services.model.adapter_options import AdapterOptions, add_adapter_options
from services.runtime.grpc_server import ServerOptions, add_server_options
from services.runtime.redis_client import redis_url_problem

ENV_REDIS_URL = "INTERNVL_REDIS_URL"

# FetchEmbeddings chunks: 1 MiB by default, and never so large that a message nears the gRPC limit.
DEFAULT_CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES = 4096
_MESSAGE_HEADROOM_BYTES = 64 * 1024


@dataclass(frozen=True)
class VisionConfig:
    """Everything ``internvl-serve vision`` can be told. Validated on construction."""

    model: str
    server: ServerOptions = field(default_factory=lambda: ServerOptions(port=0))
    # None: the in-process store (single-process demos only; the LLM service cannot read it).
    redis_url: str | None = None
    # None: bfloat16 on a GPU, float32 on CPU (services.model.modules.resolve_dtype).
    dtype: str | None = None
    # None: cuda when available, else cpu.
    device: str | None = None
    # Most tiles one encoder forward takes; bounds activation memory. Larger requests are split.
    max_batch_tiles: int = 32
    # How long the first queued tile waits for others to join its batch.
    max_wait_ms: float = 5.0
    # Expiry of cache entries; None: none (Redis's LRU eviction only).
    cache_ttl_s: int | None = 24 * 3600
    # Decompression-bomb guard: images (and frames) with more pixels are rejected before decoding.
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    # Most items one Encode request may carry.
    max_items: int = 64
    # Prefix of every cache key; replicas sharing a cache and a model must share it.
    namespace: str = DEFAULT_NAMESPACE
    # Threads decoding and tiling images (Pillow releases the GIL in decode and resize).
    preprocess_threads: int = 4
    # Capacity of the in-process store used without --redis-url.
    memory_cache_bytes: int = 1 << 30
    # LoRA adapters (--lora NAME=DIR, --max-loras, --max-lora-rank): the same as the LLM pool's; the vision side of
    # each is applied here.
    adapters: AdapterOptions = field(default_factory=AdapterOptions)

    def __post_init__(self) -> None:
        url_problem = redis_url_problem(self.redis_url)
        checks = [
            (url_problem is None, f"--redis-url: {url_problem}"),
            (self.max_batch_tiles >= 1, f"--max-batch-tiles must be >= 1, got {self.max_batch_tiles}"),
            (self.max_wait_ms >= 0, f"--max-wait-ms must be >= 0, got {self.max_wait_ms}"),
            (self.cache_ttl_s is None or self.cache_ttl_s > 0,
             f"--cache-ttl-s must be > 0 (or 0 for no expiry), got {self.cache_ttl_s}"),
            (self.max_image_pixels >= 1, f"--max-image-pixels must be >= 1, got {self.max_image_pixels}"),
            (self.max_items >= 1, f"--max-items must be >= 1, got {self.max_items}"),
            (bool(self.namespace) and ":" not in self.namespace,
             f"--namespace must be non-empty and contain no ':', got {self.namespace!r}"),
            (self.preprocess_threads >= 1, f"--preprocess-threads must be >= 1, got {self.preprocess_threads}"),
            (self.memory_cache_bytes >= 1, f"memory cache size must be >= 1 byte, got {self.memory_cache_bytes}"),
            (self.server.max_message_bytes >= _MESSAGE_HEADROOM_BYTES + MIN_CHUNK_BYTES,
             f"--max-message-bytes must be >= {_MESSAGE_HEADROOM_BYTES + MIN_CHUNK_BYTES}, got "
             + str(self.server.max_message_bytes)),
            (self.dtype is None or self.dtype in DTYPE_NAMES,
             f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}"),
        ]
        checks += [(False, problem) for problem in self.adapters.problems()]
        for ok, message in checks:
            if not ok:
                raise InvalidArgumentError(message)

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0

    @property
    def max_chunk_bytes(self) -> int:
        """The largest FetchEmbeddings chunk this server sends, whatever a client asks for."""
        return self.server.max_message_bytes - _MESSAGE_HEADROOM_BYTES

    def chunk_bytes(self, requested: int) -> int:
        """The chunk size for a FetchEmbeddings request asking for ``requested`` bytes (0: the default)."""
        if requested < 0 or 0 < requested < MIN_CHUNK_BYTES:
            raise InvalidArgumentError(
                f"max_chunk_bytes must be 0 (the default, {DEFAULT_CHUNK_BYTES}) or at least {MIN_CHUNK_BYTES}, "
                f"got {requested}")
        return min(requested or DEFAULT_CHUNK_BYTES, self.max_chunk_bytes)

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> VisionConfig:
        environ = os.environ if environ is None else environ
        return cls(
            model=args.model,
            server=ServerOptions.from_args(args, environ),
            redis_url=args.redis_url or environ.get(ENV_REDIS_URL) or None,
            dtype=args.dtype,
            device=args.device,
            max_batch_tiles=args.max_batch_tiles,
            max_wait_ms=args.max_wait_ms,
            cache_ttl_s=args.cache_ttl_s or None,
            max_image_pixels=args.max_image_pixels,
            max_items=args.max_items,
            namespace=args.namespace,
            preprocess_threads=args.preprocess_threads,
            memory_cache_bytes=args.memory_cache_mb * (1 << 20),
            adapters=AdapterOptions.from_args(args),
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``internvl-serve vision`` flags; defaults come from ``VisionConfig``."""
    d = VisionConfig(model="")
    parser.add_argument("--model", required=True, help="checkpoint directory (original OpenGVLab format) or hub id")
    add_server_options(parser, default_port=None)
    parser.add_argument("--redis-url", default=None,
                        help="embedding cache, e.g. redis://redis:6379/0, or a Redis Cluster by some of its nodes: "
                             f"redis+cluster://redis-0:6379,redis-1:6379 (default: ${ENV_REDIS_URL}; without either, "
                             "an in-process cache that only this process sees: for single-process demos only)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                        help="compute and storage dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: cuda if available)")
    parser.add_argument("--max-batch-tiles", type=int, default=d.max_batch_tiles,
                        help=f"most tiles per encoder forward (default {d.max_batch_tiles})")
    parser.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                        help=f"longest a queued tile waits for a fuller batch (default {d.max_wait_ms})")
    parser.add_argument("--cache-ttl-s", type=int, default=d.cache_ttl_s,
                        help=f"expiry of cached embeddings in seconds, 0: none (default {d.cache_ttl_s})")
    parser.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                        help=f"reject larger images before decoding them (default {d.max_image_pixels})")
    parser.add_argument("--max-items", type=int, default=d.max_items,
                        help=f"most images per Encode request (default {d.max_items})")
    parser.add_argument("--namespace", default=d.namespace, help=f"cache key prefix (default {d.namespace!r})")
    parser.add_argument("--preprocess-threads", type=int, default=d.preprocess_threads,
                        help=f"threads decoding and tiling images (default {d.preprocess_threads})")
    parser.add_argument("--memory-cache-mb", type=int, default=d.memory_cache_bytes >> 20,
                        help="size of the in-process cache used without a Redis URL (default %(default)s)")
    add_adapter_options(parser)
