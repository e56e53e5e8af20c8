"""An in-process stand-in for the Redis embedding store, for single-process demos and tests.

``internvl-serve vision`` without ``--redis-url`` uses it. Nothing written here is visible to another process
(the LLM service, another vision replica), so a real deployment always runs with Redis.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Self

from redis.exceptions import OutOfMemoryError


class InProcessRedis:
    """The ``redis.asyncio.Redis`` calls ``EmbeddingCache`` makes, served from this process's memory.

    Only for single-process demos and tests: another process (the LLM service, another replica) cannot see
    these entries. Behaves like a Redis with ``maxmemory-policy allkeys-lru``: beyond ``max_bytes`` of values
    the least recently used entries are evicted, and entries with a TTL expire.
    """

    def __init__(self, max_bytes: int = 1 << 30, clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self._clock = clock
        # key -> (value, expiry time on ``clock`` or None); order is least recently used first.
        self._entries: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()
        self._bytes = 0
        self.evictions = 0

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def _live(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires is not None and self._clock() >= expires:
            self._remove(key)
            return None
        return value

    def _remove(self, key: str) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self._bytes -= len(entry[0])
        return True

    async def get(self, key: str) -> bytes | None:
        value = self._live(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ex: int | None = None) -> bool:
        value = bytes(value)
        if len(value) > self.max_bytes:
            raise OutOfMemoryError(f"value of {len(value)} bytes exceeds the in-process cache ({self.max_bytes})")
        self._remove(key)
        while self._entries and self._bytes + len(value) > self.max_bytes:
            oldest = next(iter(self._entries))
            self._remove(oldest)
            self.evictions += 1
        self._entries[key] = (value, None if ex is None else self._clock() + ex)
        self._bytes += len(value)
        return True

    async def delete(self, *keys: str) -> int:
        return sum(self._remove(key) for key in keys)

    async def exists(self, *keys: str) -> int:
        return sum(self._live(key) is not None for key in keys)

    async def ttl(self, key: str) -> int:
        """Seconds left as Redis reports them: -2 absent, -1 no expiry."""
        if self._live(key) is None:
            return -2
        expires = self._entries[key][1]
        return -1 if expires is None else max(0, round(expires - self._clock()))

    async def ping(self) -> bool:
        return True

    def pipeline(self, transaction: bool = True) -> _InProcessPipeline:
        return _InProcessPipeline(self)

    async def aclose(self) -> None:
        self._entries.clear()
        self._bytes = 0


class _InProcessPipeline:
    """``async with store.pipeline() as pipe: pipe.exists(k); await pipe.execute()`` for ``InProcessRedis``."""

    def __init__(self, store: InProcessRedis) -> None:
        self._store = store
        self._calls: list[tuple[str, tuple]] = []

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info) -> None:
        self._calls.clear()

    def exists(self, *keys: str) -> Self:
        self._calls.append(("exists", keys))
        return self

    def get(self, key: str) -> Self:
        self._calls.append(("get", (key,)))
        return self

    async def execute(self) -> list:
        calls, self._calls = self._calls, []
        return [await getattr(self._store, name)(*args) for name, args in calls]
