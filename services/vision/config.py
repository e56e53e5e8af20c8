"""The vision service's settings: one frozen object, built once from the command line and passed down.

Environment variables are read here and nowhere else, and only when ``from_args`` is called (never at import
time): ``INTERNVL_REDIS_URL`` supplies ``--redis-url`` when the flag is absent.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass

from services.contract.cache_keys import DEFAULT_NAMESPACE
from services.contract.dtypes import DTYPE_NAMES
from services.contract.errors import InvalidArgumentError
from services.contract.tiling import DEFAULT_MAX_PIXELS
from services.model.adapter_options import AdapterOptions
from services.runtime import flags
from services.runtime.flags import flag, flag_group
from services.runtime.grpc_server import ServerOptions
from services.runtime.redis_client import redis_url_problem

ENV_REDIS_URL = "INTERNVL_REDIS_URL"

# FetchEmbeddings chunks: 1 MiB by default, and never so large that a message nears the gRPC limit.
DEFAULT_CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES = 4096
_MESSAGE_HEADROOM_BYTES = 64 * 1024


@dataclass(frozen=True)
class VisionConfig:
    """Everything ``internvl-serve vision`` can be told, each field a flag. Validated on construction."""

    model: str = flag(help="checkpoint directory (original OpenGVLab format) or hub id")
    # No default port: ``--port`` is required.
    server: ServerOptions = flag_group(ServerOptions, default_factory=lambda: ServerOptions(port=0))
    # None: the in-process store (single-process demos only; the LLM service cannot read it).
    redis_url: str | None = flag(
        None, "embedding cache, e.g. redis://redis:6379/0, or a Redis Cluster by some of its nodes: "
              f"redis+cluster://redis-0:6379,redis-1:6379 (default: ${ENV_REDIS_URL}; without either, an in-process "
              "cache that only this process sees: for single-process demos only)", env=ENV_REDIS_URL)
    # None: bfloat16 on a GPU, float32 on CPU (services.model.modules.resolve_dtype).
    dtype: str | None = flag(None, "compute and storage dtype (default: bfloat16 on GPU, float32 on CPU)",
                             choices=DTYPE_NAMES)
    # None: cuda when available, else cpu.
    device: str | None = flag(None, "torch device, e.g. cuda:0 (default: cuda if available)")
    # Most tiles one encoder forward takes; bounds activation memory. Larger requests are split.
    max_batch_tiles: int = flag(32, "most tiles per encoder forward (default %(default)s)")
    # How long the first queued tile waits for others to join its batch.
    max_wait_ms: float = flag(5.0, "longest a queued tile waits for a fuller batch (default %(default)s)")
    # Expiry of cache entries; None: none (Redis's LRU eviction only).
    cache_ttl_s: int | None = flag(24 * 3600, "expiry of cached embeddings in seconds, 0: none (default %(default)s)",
                                   convert=lambda seconds, environ: seconds or None)
    # Decompression-bomb guard: images (and frames) with more pixels are rejected before decoding.
    max_image_pixels: int = flag(DEFAULT_MAX_PIXELS, "reject larger images before decoding them (default %(default)s)")
    # Most items one Encode request may carry.
    max_items: int = flag(64, "most images per Encode request (default %(default)s)")
    # Prefix of every cache key; replicas sharing a cache and a model must share it.
    namespace: str = flag(DEFAULT_NAMESPACE, "cache key prefix (default '%(default)s')")
    # Threads decoding and tiling images (Pillow releases the GIL in decode and resize).
    preprocess_threads: int = flag(4, "threads decoding and tiling images (default %(default)s)")
    # Capacity of the in-process store used without --redis-url.
    memory_cache_mb: int = flag(1024, "size of the in-process cache used without a Redis URL (default %(default)s)")
    # LoRA adapters (--lora NAME=DIR, --max-loras, --max-lora-rank): the same as the LLM pool's; the vision side of
    # each is applied here.
    adapters: AdapterOptions = flag_group(AdapterOptions, default_factory=AdapterOptions)

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
    def memory_cache_bytes(self) -> int:
        return self.memory_cache_mb << 20

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
        return flags.from_args(cls, args, environ)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``internvl-serve vision`` flags, generated from ``VisionConfig``'s fields."""
    flags.add_flags(parser, VisionConfig)
