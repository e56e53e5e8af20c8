"""The one way the services connect to Redis, and what its failures mean to a caller.

Every client retries a command that failed on a broken connection (Redis restarted, a failover, an idle connection
the network dropped) on a fresh one, with a short jittered backoff, for about three seconds; so a restarted Redis is
picked up by itself and the services need no restart. Only when Redis stays unreachable does a call fail, and then
with `NotReadyError` (UNAVAILABLE: retry later), never as an internal error. A Redis out of memory that cannot evict
(`maxmemory` with a `noeviction` policy) is `OverloadedError` (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import redis.exceptions
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from services.common.errors import NotReadyError, OverloadedError

log = logging.getLogger(__name__)

# Attempts after the first, and the backoff between them: 0.05 s doubling to 0.5 s, about 3 s in all.
RETRIES = 7
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 0.5


def connect(url: str) -> Redis:
    """A client for `url` that reconnects by itself (connections are made lazily, on the first command)."""
    return Redis.from_url(
        url,
        socket_connect_timeout=5,
        # A large embedding value is tens of MiB: generous, but never blocks forever on a hung server.
        socket_timeout=30,
        socket_keepalive=True,
        # An idle pooled connection is PINGed before reuse, so one that died while idle is replaced.
        health_check_interval=15,
        retry=Retry(ExponentialWithJitterBackoff(base=BACKOFF_BASE_S, cap=BACKOFF_CAP_S), RETRIES),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
    )


@contextlib.contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Turns Redis failures inside the block into the domain errors a caller can act on; `what` names the store."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
            redis.exceptions.ReadOnlyError) as exc:  # BusyLoadingError is a ConnectionError
        log.warning("%s unreachable: %s", what, exc)
        raise NotReadyError(f"the {what} is unreachable; retry later") from None
    except redis.exceptions.ResponseError as exc:
        if str(exc).startswith("OOM"):
            log.warning("%s is out of memory: %s", what, exc)
            raise OverloadedError(f"the {what} is full; retry later") from None
        raise
