"""The one way the services connect to Redis, and what its failures mean to a caller.

`redis://` and `rediss://` URLs name one Redis; `redis+cluster://host:port[,host:port...]` (and `rediss+cluster://`)
a Redis Cluster by some of its nodes (see `services.runtime.redis_cluster`). Both clients take the same commands.

Every client retries a command that failed on a broken connection (Redis restarted, a failover, an idle connection
the network dropped) on a fresh one, with a short jittered backoff, for about three seconds; a cluster client also
retries while the cluster is failing over or resharding (`CLUSTERDOWN`, `TRYAGAIN`, `MASTERDOWN`, slots without a
master). So a restarted Redis or a promoted replica is picked up by itself and the services need no restart. A Redis
that accepts connections but stops replying fails a command within `REPLY_TIMEOUT_S` (not retried). Only
when Redis stays unreachable does a call fail, and then with `NotReadyError` (UNAVAILABLE: retry later), never as an
internal error. A Redis out of memory that cannot evict (`maxmemory` with a `noeviction` policy) is `OverloadedError`
(RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import redis.exceptions
from redis.asyncio import Redis
from redis.asyncio.connection import BlockingConnectionPool, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from services.contract.errors import NotReadyError, OverloadedError
from services.runtime.redis_cluster import (
    ResilientRedisCluster,
    connect_cluster,
    is_cluster_url,
    parse_cluster_url,
)

log = logging.getLogger(__name__)

# A client of either kind: both take the same commands (`get`, `set`, `exists`, `delete`, `eval`, `pipeline`).
RedisClient = Redis | ResilientRedisCluster

# Attempts after the first, and the backoff between them: 0.05 s doubling to 0.5 s, about 3 s in all.
RETRIES = 7
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 0.5
# A cluster client retries for this long from a command's first failure: long enough for a replica to be promoted
# with a node timeout of a second or two (detection, then an election of about a second).
CLUSTER_RETRY_BUDGET_S = 3.0

# Connections to one Redis server per process, and how long a command waits for one when all are busy. A request
# with a hundred images reads its embeddings concurrently: with redis-py's default pool, which refuses a connection
# past its limit ("Too many connections"), that one request failed, and every other command at that moment with it.
MAX_CONNECTIONS = 100
CONNECTION_WAIT_S = 30

# Seconds to connect, and seconds one read or write on a connection may wait (a value of tens of MiB is read in many
# reads, each far quicker). A Redis that accepts connections but never replies (a paused process, a full disk under
# `appendfsync always`) fails a command after REPLY_TIMEOUT_S: timeouts are not retried, since a server that sat on
# one command for that long will not answer the next within the caller's patience either.
CONNECT_TIMEOUT_S = 5
REPLY_TIMEOUT_S = 5

_CONNECTION = {
    "socket_connect_timeout": CONNECT_TIMEOUT_S,
    "socket_timeout": REPLY_TIMEOUT_S,
    "socket_keepalive": True,
    # An idle pooled connection is PINGed before reuse, so one that died while idle is replaced.
    "health_check_interval": 15,
}

# What a cluster answers while it fails over or reshards, beyond the connection errors of any Redis; once the retries
# are spent they mean "unavailable for now" like a refused connection.
_CLUSTER_UNAVAILABLE = (redis.exceptions.ClusterError,  # CLUSTERDOWN, MASTERDOWN, too many redirections
                        redis.exceptions.TryAgainError, redis.exceptions.SlotNotCoveredError)


def connect(url: str) -> RedisClient:
    """A client for `url` that reconnects by itself (connections are made lazily, on the first command)."""
    backoff = ExponentialWithJitterBackoff(base=BACKOFF_BASE_S, cap=BACKOFF_CAP_S)
    if is_cluster_url(url):
        return connect_cluster(url, retry_budget_s=CLUSTER_RETRY_BUDGET_S, backoff=backoff, **_CONNECTION)
    # A blocking pool: past MAX_CONNECTIONS a command waits for a free connection instead of failing.
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=CONNECTION_WAIT_S,
        **_CONNECTION,
        # Broken connections only (see REPLY_TIMEOUT_S).
        retry=Retry(backoff, RETRIES, supported_errors=(redis.exceptions.ConnectionError,)),
        retry_on_error=[redis.exceptions.ConnectionError],
    )
    client = Redis(connection_pool=pool)
    client.auto_close_connection_pool = True  # closing the client closes its pool, as Redis.from_url's would
    return client


def redis_url_problem(url: str | None) -> str | None:
    """Why `connect` would refuse `url` (None: it would not, or there is no URL), for a config's start-up checks."""
    if url is None:
        return None
    try:
        parse_cluster_url(url) if is_cluster_url(url) else parse_url(url)
    except ValueError as exc:
        return f"{exc}; a Redis Cluster is redis+cluster://host:port,host:port"
    return None


@contextlib.contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Turns Redis failures inside the block into the domain errors a caller can act on; `what` names the store."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
            redis.exceptions.ReadOnlyError, *_CLUSTER_UNAVAILABLE) as exc:  # BusyLoadingError: a ConnectionError
        log.warning("%s unreachable: %s", what, exc)
        timed_out = isinstance(exc, redis.exceptions.TimeoutError)
        cause = "did not answer in time" if timed_out else "is down or failing over"
        raise NotReadyError(f"the {what} is unreachable (Redis {cause}); retry later") from None
    except redis.exceptions.ResponseError as exc:
        if isinstance(exc, redis.exceptions.OutOfMemoryError) or str(exc).startswith("OOM"):
            log.warning("%s is out of memory: %s", what, exc)
            raise OverloadedError(f"the {what} is full; retry later") from None
        raise
