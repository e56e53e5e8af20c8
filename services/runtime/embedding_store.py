"""The embedding store both services share: a self-describing value codec and a Redis store with single-flight.

Transport-free (no gRPC). The vision service writes embeddings here; the LLM service reads them by key. Keys come
from ``services.contract.cache_keys``.

* ``encode_value`` / ``decode_value``: ``MAGIC | u32 header length | JSON header | raw tensor bytes``.
  The header holds dtype, shape, payload length, a SHA-256 of the payload, the model fingerprint and the
  schema version. Never pickle. A value that fails any check decodes to ``None``, which callers treat as a
  miss and re-encode.
* ``EmbeddingCache``: get / put / exists over ``redis.asyncio.Redis`` or a Redis Cluster client
  (``services.runtime.redis_client.connect``) with per-process single-flight (``get_or_compute``). Every command
  names one key, so keys may live in any slot of a cluster (``exists`` of many keys is a pipeline, which the
  cluster client splits by node). Redis should run with ``maxmemory-policy allkeys-lru`` so that, under memory
  pressure, the least recently used embeddings are evicted rather than writes failing; entries also carry a
  TTL. An eviction is an ordinary miss, and so is a key a cluster lost in a failover (a replica promoted before
  it had received the write).

``services.vision.memstore.InProcessRedis`` serves the same Redis calls from memory for single-process demos.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import struct
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from services.contract.cache_keys import SCHEMA_VERSION
from services.model.torch_dtypes import TORCH_DTYPES

logger = logging.getLogger(__name__)

# 8 bytes that start every stored value; the last byte is the layout version of what follows.
MAGIC = b"IVLEMB\x00\x01"
_HEADER_LEN = struct.Struct(">I")
# A header is a few hundred bytes; anything far larger is garbage, not a header.
_MAX_HEADER_BYTES = 64 * 1024

_DTYPE_NAMES = {dt: name for name, dt in TORCH_DTYPES.items()}


# -------------------------------------------------------------------------------------------- tensors


def tensor_to_bytes(tensor: torch.Tensor) -> tuple[str, list[int], bytes]:
    """``(dtype name, shape, little-endian row-major bytes)`` of a tensor; no pickle, no numpy dtypes."""
    name = _DTYPE_NAMES.get(tensor.dtype)
    if name is None:
        raise ValueError(f"unsupported embedding dtype {tensor.dtype}; expected one of {list(TORCH_DTYPES)}")
    if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
        raise RuntimeError("the embedding codec assumes a little-endian host")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    # Reinterpret the elements as bytes (bf16 has no numpy dtype; uint8 does), then copy them out once.
    data = flat.view(torch.uint8).numpy().tobytes()
    return name, list(tensor.shape), data


def tensor_from_bytes(
    dtype: str, shape: list[int] | tuple[int, ...], data: bytes | bytearray
) -> torch.Tensor:
    """The inverse of ``tensor_to_bytes``; raises ``ValueError`` when ``data`` does not fit the shape."""
    torch_dtype = TORCH_DTYPES.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"unsupported dtype {dtype!r}")
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        raise ValueError(f"bad shape {shape!r}")
    expected = math.prod(shape) * torch_dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{len(data)} bytes do not hold a {dtype} tensor of shape {list(shape)}")
    if expected == 0:
        return torch.empty(tuple(shape), dtype=torch_dtype)
    # A writable copy the tensor owns (torch.frombuffer shares memory and warns on read-only buffers).
    buf = bytearray(data)
    return torch.frombuffer(buf, dtype=torch.uint8).view(torch_dtype).reshape(tuple(shape))


# ---------------------------------------------------------------------------------------------- codec


def encode_value(tensor: torch.Tensor, model_fingerprint: str) -> bytes:
    """Serialise one image's embeddings for the cache: magic, header length, JSON header, raw bytes."""
    dtype, shape, data = tensor_to_bytes(tensor)
    header = {
        "schema_version": SCHEMA_VERSION,
        "dtype": dtype,
        "shape": shape,
        "byteorder": "little",
        "nbytes": len(data),
        "checksum": "sha256:" + hashlib.sha256(data).hexdigest(),
        "model_fingerprint": model_fingerprint,
    }
    header_b = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    return b"".join((MAGIC, _HEADER_LEN.pack(len(header_b)), header_b, data))


@dataclass(frozen=True)
class StoredEmbeddings:
    """A validated cache value, not yet copied into a tensor: what ``FetchEmbeddings`` streams as is."""

    dtype: str
    shape: tuple[int, ...]
    # prod(shape) * itemsize little-endian, row-major bytes; a view into the value read from the store.
    data: memoryview

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def to_tensor(self) -> torch.Tensor:
        """A tensor owning a copy of the bytes."""
        return tensor_from_bytes(self.dtype, list(self.shape), self.data)


def _parse(blob: bytes, expected_fingerprint: str) -> tuple[StoredEmbeddings | None, str]:
    """``(value, "")`` for a valid value (checksum verified, nothing copied), else ``(None, reason)``."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        return None, f"value is {type(blob).__name__}, not bytes"
    view = memoryview(blob).cast("B")
    prefix = len(MAGIC) + _HEADER_LEN.size
    if len(view) < prefix:
        return None, f"truncated: {len(view)} bytes"
    if view[: len(MAGIC)] != MAGIC:
        return None, "bad magic"
    (header_len,) = _HEADER_LEN.unpack(view[len(MAGIC) : prefix])
    if header_len > _MAX_HEADER_BYTES or prefix + header_len > len(view):
        return None, f"bad header length {header_len}"
    try:
        header = json.loads(bytes(view[prefix : prefix + header_len]))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None, "header is not JSON"
    if not isinstance(header, dict):
        return None, "header is not an object"
    if header.get("schema_version") != SCHEMA_VERSION:
        return None, f"schema version {header.get('schema_version')!r} != {SCHEMA_VERSION}"
    if header.get("model_fingerprint") != expected_fingerprint:
        return None, "written by another model (fingerprint mismatch)"
    if header.get("byteorder") != sys.byteorder:
        return None, f"byte order {header.get('byteorder')!r}"
    payload = view[prefix + header_len :]
    if header.get("nbytes") != len(payload):
        return None, f"truncated payload: {len(payload)} bytes, header says {header.get('nbytes')!r}"
    checksum = header.get("checksum")
    if not isinstance(checksum, str) or checksum != "sha256:" + hashlib.sha256(payload).hexdigest():
        return None, "checksum mismatch"
    dtype, shape = header.get("dtype"), header.get("shape")
    if dtype not in TORCH_DTYPES:
        return None, f"unsupported dtype {dtype!r}"
    if not isinstance(shape, list) or any(
        not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape
    ):
        return None, f"bad shape {shape!r}"
    if math.prod(shape) * TORCH_DTYPES[dtype].itemsize != len(payload):
        return None, f"{len(payload)} bytes do not hold a {dtype} tensor of shape {shape}"
    return StoredEmbeddings(dtype, tuple(shape), payload), ""


def _decode(blob: bytes, expected_fingerprint: str) -> tuple[torch.Tensor | None, str]:
    """``(tensor, "")`` for a valid value, else ``(None, reason)``."""
    value, reason = _parse(blob, expected_fingerprint)
    if value is None:
        return None, reason
    try:
        return value.to_tensor(), ""
    except (TypeError, ValueError) as exc:
        return None, str(exc)


def decode_value(blob: bytes, expected_fingerprint: str) -> torch.Tensor | None:
    """The tensor stored in ``blob``, or ``None`` if it is corrupt, truncated or from another model."""
    tensor, _reason = _decode(blob, expected_fingerprint)
    return tensor


# ---------------------------------------------------------------------------------------------- store


@dataclass
class _Flight:
    """One in-progress fill of a key, shared by every caller waiting for it."""

    task: asyncio.Task
    waiters: int = 0


class EmbeddingCache:
    """Embeddings in Redis under content-addressed keys, for one model.

    Redis errors (connection refused, OOM on write) propagate to the caller: without the cache the
    embeddings cannot reach the LLM service. Only bad *values* are misses.
    """

    def __init__(self, redis: Redis | RedisCluster, model_fingerprint: str, default_ttl_s: int | None = None) -> None:
        if not model_fingerprint:
            raise ValueError("model_fingerprint must not be empty")
        if default_ttl_s is not None and default_ttl_s <= 0:
            raise ValueError(f"default_ttl_s must be positive or None, got {default_ttl_s}")
        self.redis = redis
        self.model_fingerprint = model_fingerprint
        # TTL of entries written by ``put`` when it is given none; ``None``: no expiry (LRU eviction only).
        self.default_ttl_s = default_ttl_s

        # Counters for a metrics layer to read; they only grow.
        self.hits = 0
        self.misses = 0
        # Values found but rejected (corrupt, truncated, another model's); each also counts as a miss.
        self.corrupt = 0
        self.bytes_written = 0
        # Times ``get_or_compute`` ran its ``compute`` callable.
        self.computes = 0
        # Calls to ``get_or_compute`` that joined a fill already in progress instead of starting one.
        self.single_flight_joins = 0

        self._inflight: dict[str, _Flight] = {}

    async def get(self, key: str) -> torch.Tensor | None:
        """The embeddings under ``key``, or ``None`` when absent or invalid (an invalid value is deleted)."""
        return await self._load(key, _decode)

    async def read(self, key: str) -> StoredEmbeddings | None:
        """Like ``get`` but without building a tensor: the validated dtype, shape and raw bytes."""
        return await self._load(key, _parse)

    async def _load(self, key: str, decode: Callable[[bytes, str], tuple[object, str]]):
        blob = await self.redis.get(key)
        if blob is None:
            self.misses += 1
            return None
        # Checksumming and copying tens of MiB would stall the event loop; hashlib releases the GIL.
        value, reason = await asyncio.to_thread(decode, blob, self.model_fingerprint)
        if value is None:
            self.corrupt += 1
            self.misses += 1
            logger.warning("embedding cache: discarding value of %s: %s", key, reason)
            # Deleted so that ``exists`` stops reporting it and the next Encode rewrites it. A good value
            # written concurrently by another replica could be deleted too; that only costs a re-encode.
            await self.redis.delete(key)
            return None
        self.hits += 1
        return value

    async def put(self, key: str, tensor: torch.Tensor, ttl_s: int | None = None) -> int:
        """Store ``tensor`` under ``key`` with ``ttl_s`` (else ``default_ttl_s``); returns bytes written."""
        ttl = ttl_s if ttl_s is not None else self.default_ttl_s
        if ttl is not None and ttl <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl}")
        blob = await asyncio.to_thread(encode_value, tensor, self.model_fingerprint)
        await self.redis.set(key, blob, ex=ttl)
        self.bytes_written += len(blob)
        return len(blob)

    async def exists(self, keys: list[str]) -> list[bool]:
        """Whether each key is present now (it may be evicted at any later moment)."""
        if not keys:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.exists(key)
            counts = await pipe.execute()
        return [bool(c) for c in counts]

    async def get_or_compute(
        self,
        key: str,
        compute: Callable[[], Awaitable[torch.Tensor]],
        ttl_s: int | None = None,
    ) -> tuple[torch.Tensor, bool]:
        """The embeddings under ``key``, computing and storing them on a miss: ``(tensor, hit)``.

        Concurrent callers in this process for the same key share one lookup and at most one
        ``compute``; all of them get the first caller's ``hit`` flag (``False`` when it had to compute).
        The shared work runs in its own task: a caller that is cancelled stops waiting, and the work is
        cancelled only when no caller is left waiting for it. An exception from ``compute`` or Redis
        reaches every waiting caller; the next call starts afresh.
        """
        flight = self._inflight.get(key)
        if flight is None:
            task = asyncio.get_running_loop().create_task(
                self._fill(key, compute, ttl_s), name=f"embedding-cache-fill {key}"
            )
            flight = _Flight(task)
            self._inflight[key] = flight
            task.add_done_callback(lambda _t, k=key, f=flight: self._forget(k, f))
        else:
            self.single_flight_joins += 1
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.task)
        except asyncio.CancelledError:
            if not flight.task.done() and flight.waiters == 1:
                # This caller was the last one waiting: stop the work, and let the next caller start
                # a fresh fill rather than join one that is being cancelled.
                self._forget(key, flight)
                flight.task.cancel()
            raise
        finally:
            flight.waiters -= 1

    def _forget(self, key: str, flight: _Flight) -> None:
        if self._inflight.get(key) is flight:
            del self._inflight[key]

    async def _fill(
        self, key: str, compute: Callable[[], Awaitable[torch.Tensor]], ttl_s: int | None
    ) -> tuple[torch.Tensor, bool]:
        tensor = await self.get(key)
        if tensor is not None:
            return tensor, True
        self.computes += 1
        tensor = await compute()
        await self.put(key, tensor, ttl_s)
        return tensor, False
