"""The vision service's core, free of any transport: images in, cache keys out.

``VisionService.encode`` validates a request, derives each item's content-addressed key, and for each key
not already cached decodes and tiles the image (in a thread pool, off the event loop), queues its tiles on
the micro-batcher, and writes the embeddings, [num_tiles * 256, llm_hidden] in the compute dtype, to the
cache. Concurrent requests for the same missing key encode it once (the cache's single-flight).

A request may name a LoRA adapter: one that changes the vision tower or projector encodes with its own slot (tiles
of different adapters still share the encoder's batches) under keys of its own; one that does not encodes as the base,
under the base's keys, so a language-only adapter shares the base's embeddings.

The gRPC servicer (``services.vision.server``) only translates messages to and from the types below.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import urllib.parse
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import redis.exceptions
import torch
from PIL import Image

from services.contract.cache_keys import key_prefix
from services.contract.dtypes import dtype_name
from services.contract.encoding import EncodedItem, MediaItem, PreprocessOptions, item_key
from services.contract.errors import (
    InvalidArgumentError,
    InvalidMediaError,
    NotFoundError,
    NotReadyError,
)
from services.contract.model_info import AdapterInfo, ModelInfo
from services.contract.tiling import MAX_NUM_LIMIT
from services.model.adapters import VISION_PREFIXES, Adapter, read_adapters
from services.model.checkpoint import Checkpoint, open_checkpoint
from services.model.modules import (
    InternVLVisionPath,
    default_device,
    install_vision_adapters,
    load_vision,
    resolve_dtype,
)
from services.runtime.embedding_store import EmbeddingCache, StoredEmbeddings, tensor_to_bytes
from services.runtime.own_thread import in_own_thread
from services.runtime.redis_client import RedisClient, redis_errors
from services.runtime.redis_client import connect as connect_redis
from services.vision.batcher import Encoder, MicroBatcher
from services.vision.config import VisionConfig
from services.vision.memstore import InProcessRedis
from services.vision.metrics import VisionMetrics
from services.vision.preprocess import dynamic_tiles, open_image, tiles_to_tensor

log = logging.getLogger(__name__)

# Most keys one Lookup may ask about, and the longest key accepted.
MAX_LOOKUP_KEYS = 4096
MAX_KEY_CHARS = 256
# The model's defaults for every option.
_DEFAULT_OPTIONS = PreprocessOptions()


# ------------------------------------------------------------------------------------------- domain types


# ------------------------------------------------------------------------------------------------- service


class VisionService:
    """Encode / Lookup / Fetch / model info over one loaded vision path, a cache store and a micro-batcher."""

    def __init__(self, config: VisionConfig, checkpoint: Checkpoint, encoder: Encoder, dtype: torch.dtype,
                 store: RedisClient | InProcessRedis, metrics: VisionMetrics | None = None,
                 adapters: tuple[AdapterInfo, ...] = (), slots: Mapping[str, int] | None = None) -> None:
        """`encoder(pixels, tile_slots)` encodes tiles, tile i with adapter slot `tile_slots[i]`; `slots` names the
        slot of each adapter installed in the vision path (those touching it); the others encode as the base."""
        self.config = config
        self.checkpoint = checkpoint
        self.adapters = adapters
        self.info = checkpoint.model_info(dtype, adapters)
        self._slots = dict(slots or {})
        spec = checkpoint.spec
        self.dtype = dtype
        self.dtype_name = dtype_name(dtype)
        self.tokens_per_tile = spec.tokens_per_tile
        self.hidden_size = spec.llm_hidden_size
        self.image_size = spec.image_size
        self.default_max_num = spec.max_dynamic_patch
        self.default_use_thumbnail = spec.use_thumbnail
        self.store = store
        self.cache = EmbeddingCache(store, checkpoint.fingerprint, default_ttl_s=config.cache_ttl_s)
        self.metrics = metrics if metrics is not None else VisionMetrics()
        self.batcher = MicroBatcher(encoder, max_batch_tiles=config.max_batch_tiles, max_wait_s=config.max_wait_s,
                                    on_batch=self.metrics.observe_batch)
        self.metrics.watch_queue(lambda: self.batcher.queued_tiles, lambda: self.batcher.tiles_cancelled)
        self.metrics.watch_cache(lambda: self.cache.bytes_written, lambda: self.cache.corrupt)
        self.metrics.set_model(checkpoint.fingerprint, checkpoint.name, self.dtype_name)
        self._pool = ThreadPoolExecutor(config.preprocess_threads, thread_name_prefix="vision-preprocess")
        self._model: torch.nn.Module | None = None
        self._prefix = key_prefix(config.namespace)

    @classmethod
    async def load(cls, config: VisionConfig, metrics: VisionMetrics | None = None,
                   store: RedisClient | InProcessRedis | None = None) -> VisionService:
        """Opens the checkpoint, loads the vision path (off the loop), connects the cache and starts batching."""
        device = torch.device(config.device) if config.device else default_device()
        dtype = resolve_dtype(config.dtype, device)
        checkpoint, model, adapters = await in_own_thread(_open_and_load, config, dtype, device)
        slots = install_vision_adapters(model, [a for a in adapters if a.touches_vision])
        if store is None:
            store = await connect_store(config)

        def encode(pixel_values: torch.Tensor, tile_slots: list[int]) -> torch.Tensor:
            with slots.rows(tile_slots, device):
                return model.encode(pixel_values).to("cpu")

        service = cls(config, checkpoint, encode, dtype, store, metrics, tuple(a.info() for a in adapters),
                      slots.slot)
        service._model = model
        service.start()
        log.info("vision path of %s (fingerprint %s) loaded on %s in %s", checkpoint.name, checkpoint.fingerprint,
                 device, service.dtype_name)
        for adapter in adapters:
            log.info("serving LoRA adapter %s (digest %s): %s", adapter.name, adapter.digest,
                     f"{len(adapter.part(VISION_PREFIXES))} vision layers" if adapter.touches_vision
                     else "language only, encodes as the base")
        return service

    def start(self) -> None:
        self.batcher.start()

    async def warm_up(self) -> None:
        """Runs one blank tile through the batcher and the encoder (kernels, allocator, lazy init)."""
        # numpy, not torch.zeros: no torch kernel on the event loop's thread (see services.runtime.own_thread).
        blank = torch.from_numpy(np.zeros((1, 3, self.image_size, self.image_size), dtype=np.float32))
        out = await self.batcher.encode(blank)
        expected = (1, self.tokens_per_tile, self.hidden_size)
        if tuple(out.shape) != expected:
            raise RuntimeError(f"warm-up produced {tuple(out.shape)}, expected {expected}")

    async def close(self) -> None:
        await self.batcher.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        await self.store.aclose()
        device = next(self._model.parameters()).device if self._model is not None else None
        self._model = None
        if device is not None and device.type == "cuda":
            torch.cuda.empty_cache()

    def model_info(self) -> ModelInfo:
        return self.info

    # ---------------------------------------------------------------------------------------------- encode

    async def encode(self, items: Sequence[MediaItem], options: PreprocessOptions = _DEFAULT_OPTIONS,
                     adapter: str = "", key_salt: str = "") -> list[EncodedItem]:
        """Per item, in order: its key (salted with `key_salt`, "" unsalted), tile and token counts, and whether the
        cache already held it."""
        if adapter and self.info.adapter(adapter) is None:
            raise NotFoundError(f"model {adapter!r} is not served by this vision server (adapters: "
                                f"{', '.join(a.name for a in self.adapters) or 'none'})")
        max_num, use_thumbnail = self._resolve(options)
        if not items:
            raise InvalidArgumentError("no items to encode")
        if len(items) > self.config.max_items:
            raise InvalidArgumentError(f"{len(items)} items in one request; at most {self.config.max_items} allowed")
        for index, item in enumerate(items):
            self._check_item(index, item)
        loop = asyncio.get_running_loop()
        # Hashing megabytes of media is real work: keep it off the loop too.
        keys = await loop.run_in_executor(self._pool, self._keys, items, max_num, use_thumbnail, adapter, key_salt)
        slot = self._slots.get(adapter, 0)
        tasks = [asyncio.ensure_future(self._encode_item(i, item, key, max_num, use_thumbnail, slot))
                 for i, (item, key) in enumerate(zip(items, keys, strict=True))]
        try:
            with self._cache_errors():
                return list(await asyncio.gather(*tasks))
        except BaseException:
            # One bad item fails the request: stop the others (work shared with other requests carries on).
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    def _resolve(self, options: PreprocessOptions) -> tuple[int, bool]:
        max_num = self.default_max_num if options.max_num is None else options.max_num
        if isinstance(max_num, bool) or not isinstance(max_num, int) or not 1 <= max_num <= MAX_NUM_LIMIT:
            raise InvalidArgumentError(f"max_num must be between 1 and {MAX_NUM_LIMIT}, got {max_num}")
        use_thumbnail = self.default_use_thumbnail if options.use_thumbnail is None else bool(options.use_thumbnail)
        return max_num, use_thumbnail

    def _check_item(self, index: int, item: MediaItem) -> None:
        """The checks that need no decoding; the rest happen when (and only if) the item is encoded."""
        where = f"items[{index}]"
        if item.kind == "image":
            if not item.data:
                raise InvalidMediaError(f"{where}: image data is empty", item_index=index)
        elif item.kind == "frame":
            h, w = item.height, item.width
            if h <= 0 or w <= 0:
                raise InvalidMediaError(f"{where}: frame size must be positive, got {h}x{w}", item_index=index)
            if len(item.data) != h * w * 3:
                raise InvalidMediaError(
                    f"{where}: an RGB frame of {h}x{w} has {h * w * 3} bytes, got {len(item.data)}", item_index=index)
            if h * w > self.config.max_image_pixels:
                raise InvalidMediaError(f"{where}: frame is {w}x{h} = {w * h} pixels, above the limit of "
                                        f"{self.config.max_image_pixels}", item_index=index)
        else:
            raise InvalidArgumentError(f"{where}: neither image_bytes nor frame is set", item_index=index)

    def _keys(self, items: Sequence[MediaItem], max_num: int, use_thumbnail: bool, adapter: str,
              key_salt: str) -> list[str]:
        return [self.key_for(item, max_num, use_thumbnail, adapter, key_salt) for item in items]

    def key_for(self, item: MediaItem, max_num: int, use_thumbnail: bool, adapter: str = "",
                key_salt: str = "") -> str:
        """The cache key of ``item`` under resolved options, `adapter` and `key_salt` (what Encode answers for it)."""
        # Keys fold the compute dtype (and a vision adapter's digest) into the model identity; values carry the plain
        # fingerprint (what the LLM service checks), their dtype being in their own header.
        return item_key(item, self.info.key_identity(adapter, key_salt), max_num, use_thumbnail, self.image_size,
                        self.config.namespace)

    async def _encode_item(self, index: int, item: MediaItem, key: str, max_num: int,
                           use_thumbnail: bool, slot: int) -> EncodedItem:
        tensor, hit = await self._embeddings(index, item, key, max_num, use_thumbnail, slot)
        rows = tensor.shape[0]
        return EncodedItem(key=key, num_tiles=rows // self.tokens_per_tile, num_tokens=rows, cache_hit=hit)

    async def _embeddings(self, index: int, item: MediaItem, key: str, max_num: int, use_thumbnail: bool,
                          slot: int) -> tuple[torch.Tensor, bool]:
        """`item`'s embeddings [tiles * tokens_per_tile, hidden] from the cache, or encoded and stored: (rows, hit)."""
        compute = functools.partial(self._compute, item, max_num, use_thumbnail, slot)
        # A hit reads and checks the whole value: one the LLM service would reject must not count as present.
        try:
            tensor, hit = await self.cache.get_or_compute(key, compute)
            if hit and not self._well_formed(tensor):
                # Valid bytes of the right model but not embeddings of this shape: only a bug writes that.
                log.error("cache value of %s has shape %s; re-encoding", key, tuple(tensor.shape))
                await self.store.delete(key)
                tensor, hit = await self.cache.get_or_compute(key, compute)
        except InvalidMediaError as exc:
            # Raised once for every request sharing the key: each caller names its own item.
            raise InvalidMediaError(f"items[{index}]: {exc}", item_index=index) from None
        self.metrics.observe_item(hit)
        return tensor, hit

    def _well_formed(self, tensor: torch.Tensor) -> bool:
        return (tensor.dim() == 2 and tensor.shape[1] == self.hidden_size and tensor.shape[0] > 0
                and tensor.shape[0] % self.tokens_per_tile == 0)

    async def _compute(self, item: MediaItem, max_num: int, use_thumbnail: bool, slot: int) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        pixels = await loop.run_in_executor(self._pool, self._preprocess, item, max_num, use_thumbnail)
        embeddings = await self.batcher.encode(pixels, slot)  # [tiles, tokens_per_tile, hidden]
        return embeddings.reshape(-1, embeddings.shape[-1])

    def _preprocess(self, item: MediaItem, max_num: int, use_thumbnail: bool) -> torch.Tensor:
        """Decode (or wrap) and tile one image: float32 [tiles, 3, S, S]. Runs in the preprocessing pool."""
        if item.kind == "frame":
            image = Image.frombytes("RGB", (item.width, item.height), item.data)
        else:
            image = open_image(item.data, max_pixels=self.config.max_image_pixels)
        tiles = dynamic_tiles(image, max_num=max_num, image_size=self.image_size, use_thumbnail=use_thumbnail)
        return tiles_to_tensor(tiles, self.image_size)

    # ---------------------------------------------------------------------------------------- lookup, fetch

    async def lookup(self, keys: Sequence[str]) -> list[bool]:
        if len(keys) > MAX_LOOKUP_KEYS:
            raise InvalidArgumentError(f"{len(keys)} keys in one lookup; at most {MAX_LOOKUP_KEYS} allowed")
        for index, key in enumerate(keys):
            self._check_key(key, f"keys[{index}]", index)
        with self._cache_errors():
            return await self.cache.exists(list(keys))

    async def fetch(self, key: str) -> StoredEmbeddings:
        """The validated value under ``key``; NotFoundError when it is absent, expired, evicted or corrupt."""
        self._check_key(key, "key")
        with self._cache_errors():
            value = await self.cache.read(key)
        if value is None:
            raise NotFoundError(f"no embeddings under {key} (never encoded, expired or evicted): encode it again")
        return value

    async def fetch_or_encode(self, key: str, item: MediaItem, options: PreprocessOptions = _DEFAULT_OPTIONS,
                              adapter: str = "", key_salt: str = "") -> StoredEmbeddings:
        """The embeddings under ``key`` (``item``'s key under `options`, `adapter` and `key_salt`), encoded from
        ``item`` (and stored) when the cache does not hold them.

        What is returned is the tensor this call read or computed, never read back from the cache: an eviction
        right after the write cannot take it away (the caller hands it to the LLM service inline).
        """
        self._check_key(key, "key")
        if adapter and self.info.adapter(adapter) is None:
            raise NotFoundError(f"model {adapter!r} is not served by this vision server")
        max_num, use_thumbnail = self._resolve(options)
        self._check_item(0, item)
        loop = asyncio.get_running_loop()
        expected = await loop.run_in_executor(self._pool, self.key_for, item, max_num, use_thumbnail, adapter,
                                              key_salt)
        if expected != key:
            raise InvalidArgumentError(f"key {key[:80]!r} is not the key of the item under these options "
                                       f"({expected[:80]!r}): send the options, adapter and salt it was encoded with")
        with self._cache_errors():
            tensor, _ = await self._embeddings(0, item, key, max_num, use_thumbnail, self._slots.get(adapter, 0))
        dtype, shape, data = await loop.run_in_executor(self._pool, tensor_to_bytes, tensor)
        return StoredEmbeddings(dtype, tuple(shape), memoryview(data))

    def _check_key(self, key: str, where: str, index: int | None = None) -> None:
        if not key.startswith(self._prefix) or len(key) > MAX_KEY_CHARS:
            raise InvalidArgumentError(f"{where}: {key[:80]!r} is not an embedding key of this service "
                                       f"(expected {self._prefix}...)", item_index=index)

    def _cache_errors(self) -> contextlib.AbstractContextManager[None]:
        """An unreachable cache is UNAVAILABLE (retry elsewhere or later), not an internal error."""
        return redis_errors("embedding cache")


def _open_and_load(config: VisionConfig, dtype: torch.dtype, device: torch.device
                   ) -> tuple[Checkpoint, InternVLVisionPath, list[Adapter]]:
    checkpoint = open_checkpoint(config.model)
    adapters = read_adapters(config.adapters, checkpoint)
    return checkpoint, load_vision(checkpoint, dtype, device), adapters


async def connect_store(config: VisionConfig) -> RedisClient | InProcessRedis:
    """A connected Redis client for ``config.redis_url``, or the in-process store when there is none."""
    if config.redis_url is None:
        log.warning("no --redis-url: using an in-process embedding cache that no other process can read "
                    "(single-process demos only)")
        return InProcessRedis(max_bytes=config.memory_cache_bytes)
    client = connect_redis(config.redis_url)
    try:
        await client.ping()
    except redis.exceptions.RedisError as exc:
        await client.aclose()
        raise NotReadyError(f"cannot reach the embedding cache at {_redact(config.redis_url)}: {exc}") from None
    return client


def _redact(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urllib.parse.urlunsplit(parts._replace(netloc=user + netloc))
