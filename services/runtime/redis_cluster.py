"""Redis Cluster behind the same contract as one Redis: the `redis+cluster://` URL form, and a client that rides out
a failover.

`redis+cluster://[user[:password]@]host[:port][,host[:port]...][/][?option=value...]` (`rediss+cluster://` for TLS)
names startup nodes of one Redis Cluster; the client reads the slot map from the first that answers and follows
MOVED and ASK redirections by itself (redis-py's `RedisCluster`). Query options are redis-py's URL options
(`ssl_ca_certs`, `ssl_cert_reqs`, `socket_timeout`, ...), as for a plain `redis://` URL.

redis-py's own cluster retries come back at once, with no backoff (only a count is configurable), so a failover,
which takes about the node timeout plus an election (one to a few seconds), would use them up before a replica is
promoted. Here every command and every pipeline is instead retried with a jittered exponential backoff for a fixed
time from its first failure: a refused connection to a dead master (the slot map is re-read before the next try),
`CLUSTERDOWN` (no master for some slot yet), `MASTERDOWN`, `TRYAGAIN` (keys moving during a resharding), a slot no
master covers, and a slot map no node could give. After the budget the last error reaches the caller, who maps it
with `services.runtime.redis_client.redis_errors`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import traceback
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.exceptions
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import AbstractBackoff, NoBackoff

from services.runtime.host_port import split_host_port

log = logging.getLogger(__name__)

T = TypeVar("T")

# scheme -> TLS
SCHEMES = {"redis+cluster": False, "rediss+cluster": True}
DEFAULT_PORT = 6379


class ClusterUnreachableError(redis.exceptions.ConnectionError):
    """No startup node gave a usable slot map (all unreachable, not in cluster mode, or disagreeing mid-failover)."""


# A cluster that is failing over or resharding answers these for a few seconds; they say "try again soon".
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,  # includes BusyLoadingError, MaxConnectionsError, ClusterUnreachableError
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterDownError,  # includes MasterDownError
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterError,  # "TTL exhausted": too many redirections in a row
    redis.exceptions.SlotNotCoveredError,
)


_CONNECTION_MODULE = os.path.join("redis", "asyncio", "connection.py")

# -------------------------------------------------------------------------------------------------------- URL


def is_cluster_url(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme.lower() in SCHEMES


@dataclass(frozen=True)
class ClusterUrl:
    nodes: tuple[tuple[str, int], ...]
    tls: bool
    # username, password and the query's options, as redis-py's parse_url reads them
    options: dict[str, Any] = field(default_factory=dict)


def parse_cluster_url(url: str) -> ClusterUrl:
    """The startup nodes, TLS and options of a `redis+cluster://` URL; ValueError when it is malformed."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"not a Redis Cluster URL (expected {' or '.join(s + '://' for s in SCHEMES)}): "
                         f"{_redacted(parts)}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    nodes = tuple(_host_port(item, url) for item in hosts.split(","))
    # The rest (credentials, a /0 path, the query) reads as a single-node URL, with redis-py's parser.
    tls = SCHEMES[scheme]
    single = urllib.parse.urlunsplit(("rediss" if tls else "redis", (userinfo + "@" if userinfo else "") + "node",
                                      parts.path, parts.query, ""))
    options = dict(parse_url(single))
    for name in ("host", "port", "connection_class"):
        options.pop(name, None)
    if options.pop("db", 0):
        raise ValueError("a Redis Cluster has only database 0")
    return ClusterUrl(nodes, tls, options)


def _host_port(item: str, url: str) -> tuple[str, int]:
    try:
        host, port = split_host_port(item, DEFAULT_PORT)
    except ValueError:
        raise ValueError(f"bad node {item.strip()!r} in Redis Cluster URL {_redacted(urllib.parse.urlsplit(url))}; "
                         "expected host:port[,host:port...]") from None
    return urllib.parse.unquote(host), port


def _redacted(parts: urllib.parse.SplitResult) -> str:
    _userinfo, at, hosts = parts.netloc.rpartition("@")
    return urllib.parse.urlunsplit(parts._replace(netloc=("***@" if at else "") + hosts))


# ----------------------------------------------------------------------------------------------------- retries


async def retry_transient(attempt: Callable[[], Awaitable[T]], budget_s: float, backoff: AbstractBackoff) -> T:
    """`attempt()`, called again after a backoff while it fails with a transient cluster error and less than
    `budget_s` have passed since its first failure; then that error is raised."""
    failures = 0
    deadline = None
    while True:
        try:
            try:
                return await attempt()
            except (AttributeError, TypeError) as exc:
                if not _closed_during_write(exc):
                    raise
                raise redis.exceptions.ConnectionError(
                    f"the connection closed during a write ({type(exc).__name__})") from exc
        except TRANSIENT_ERRORS as exc:
            now = time.monotonic()
            deadline = deadline or now + budget_s
            if now >= deadline:
                raise
            failures += 1
            log.debug("redis cluster: %s (%s); retry %d", type(exc).__name__, exc, failures)
            await asyncio.sleep(min(backoff.compute(failures), deadline - now))


def _closed_during_write(exc: AttributeError | TypeError) -> bool:
    """Whether `exc` is a write on a connection that closed meanwhile, which should have been a ConnectionError.

    redis-py 8.1's asyncio connection writes through a stream writer another task may have torn down (a node of a
    failing-over cluster dropping its connections): the write then fails with `AttributeError` (`_writer` is None) or
    `TypeError` (the transport's callbacks cleared) instead of `ConnectionError` (redis-py issues #3546 and #4287),
    and no retry recognises it. Only errors raised inside redis-py's connection write count; anything else is a bug
    and stays what it is.
    """
    return any(frame.filename.endswith(_CONNECTION_MODULE) and "send_packed_command" in frame.name
               for frame in traceback.extract_tb(exc.__traceback__))


class ResilientRedisCluster(RedisCluster):
    """redis-py's `RedisCluster` whose commands and pipelines are retried with a backoff (`retry_transient`)."""

    def __init__(self, *args: Any, retry_budget_s: float, backoff: AbstractBackoff, **kwargs: Any) -> None:
        # redis-py retries nothing by itself (its retries carry no backoff): every retry is ours.
        super().__init__(*args, retry=Retry(NoBackoff(), 0), **kwargs)
        self._retry_budget_s = retry_budget_s
        self._backoff = backoff

    async def retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        return await retry_transient(attempt, self._retry_budget_s, self._backoff)

    def mark_slot_map_stale(self) -> None:
        """The next command reads the slot map again first. redis-py does this itself after a single command failed
        on a connection, but not after a failed pipeline unless it retries the pipeline itself (it does not here):
        without it, a pipeline would keep going to a dead master after its replica took over."""
        self._initialize = True

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        # redis-py pops what it reads from its own copy of kwargs, so every attempt gets them whole.
        return await self.retrying(lambda: super(ResilientRedisCluster, self).execute_command(*args, **kwargs))

    async def initialize(self, *args: Any, **kwargs: Any) -> ResilientRedisCluster:
        try:
            await super().initialize(*args, **kwargs)
        except redis.exceptions.RedisClusterException as exc:
            # Not a RedisError in redis-py, but as transient as a refused connection: the slot map is read again.
            raise ClusterUnreachableError(str(exc)) from exc
        return self

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint:
            raise redis.exceptions.RedisClusterException("shard_hint is deprecated in cluster mode")
        return ReplayingPipeline(self, transaction)


class ReplayingPipeline(ClusterPipeline):
    """A cluster pipeline that is sent again whole after a transient failure (`ClusterPipeline.execute` empties
    its queue even when it fails, so the commands are kept here). Fit for reads and idempotent writes only, which
    is all this project pipelines."""

    cluster_client: ResilientRedisCluster

    def __init__(self, client: ResilientRedisCluster, transaction: Any | None = None) -> None:
        super().__init__(client, transaction)
        self._queued: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    async def initialize(self) -> ReplayingPipeline:
        # Entering `async with` reads no slot map: `execute` does, inside its retries.
        return self

    def execute_command(self, *args: Any, **kwargs: Any) -> ReplayingPipeline:
        self._queued.append((args, dict(kwargs)))
        super().execute_command(*args, **kwargs)
        return self

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        queued, self._queued = self._queued, []
        if not queued:
            return []
        tries = 0

        async def attempt() -> list[Any]:
            nonlocal tries
            if tries:
                for args, kwargs in queued:
                    ClusterPipeline.execute_command(self, *args, **dict(kwargs))
            tries += 1
            try:
                return await ClusterPipeline.execute(self, raise_on_error, allow_redirections)
            except TRANSIENT_ERRORS:
                self.cluster_client.mark_slot_map_stale()
                raise

        return await self.cluster_client.retrying(attempt)

    async def reset(self) -> None:
        self._queued = []
        await super().reset()


# ----------------------------------------------------------------------------------------------------- connect


def connect_cluster(url: str, *, retry_budget_s: float, backoff: AbstractBackoff,
                    **client_options: Any) -> ResilientRedisCluster:
    """A cluster client for a `redis+cluster://` URL (connections and the slot map are made lazily, on the first
    command); `client_options` are connection options (timeouts, keepalive), which the URL's query overrides."""
    parsed = parse_cluster_url(url)
    options = {**client_options, **parsed.options}
    return ResilientRedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parsed.nodes],
        ssl=parsed.tls,
        retry_budget_s=retry_budget_s,
        backoff=backoff,
        # A slot without a master (mid-failover) fails only its own keys, never the whole client.
        require_full_coverage=False,
        # After this many MOVED replies the whole slot map is re-read, not just the one slot patched.
        reinitialize_steps=5,
        # Per node. redis-py fails a command (MaxConnectionsError) rather than wait for a free connection, and one
        # service sends a few hundred commands at once under load (every image of every request in a batch).
        max_connections=1024,
        **options,
    )
