"""Per-tenant admission: a token bucket for each tenant's rate and a count of its requests running.

A tenant with `rate` r and bucket size b (`gateway.tenants.Tenant`) may send b requests at once, then r per second;
one with `max_concurrent` c has at most c requests answered at a time. A request over either limit is refused before
any work with `TenantLimitError` (RESOURCE_EXHAUSTED, HTTP 429) carrying when to retry: when the bucket holds a
request again, or one second for the concurrency limit (nothing tells when a running request ends).

The state is this gateway process's own: with N gateway replicas behind a load balancer a tenant gets up to N times
its limits. Tenants without limits (the `anonymous`, `default` and certificate-named ones) keep no state.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable

from gateway.tenants import Tenant
from services.contract.errors import OverloadedError

# The retry advice of a refusal by the concurrency limit.
CONCURRENCY_RETRY_S = 1.0


class TenantLimitError(OverloadedError):
    """A tenant over its rate or concurrency limit; `limit` is which ("rate" or "concurrency")."""

    def __init__(self, message: str, retry_after_s: float, limit: str):
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.limit = limit


class TokenBucket:
    """Holds up to `size` tokens, refilled at `rate` per second of `clock` (seconds, monotonic); full at start."""

    def __init__(self, rate: float, size: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.size = size
        self.clock = clock
        self.tokens = float(size)
        self.at = clock()

    def take(self) -> float:
        """Takes a token: 0.0 when one was there, else the seconds until one will be (and nothing is taken)."""
        now = self.clock()
        self.tokens = min(float(self.size), self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class Admission:
    """One admitted request: running until this context exits."""

    def __init__(self, limits: TenantLimits, name: str):
        self._limits = limits
        self._name = name

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info) -> None:
        self._limits._release(self._name)


class TenantLimits:
    """Every tenant's bucket and running count, in this process (one event loop: no locking needed)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._running: collections.Counter[str] = collections.Counter()

    def running(self, name: str) -> int:
        return self._running[name]

    def admit(self, tenant: Tenant) -> Admission:
        """Admits one request of `tenant`, counted as running until the returned context exits (use it in a `with`
        at once); TenantLimitError when it is over a limit. The concurrency limit is checked first, so a refused
        request takes no token."""
        name = tenant.name
        if tenant.max_concurrent is not None and self._running[name] >= tenant.max_concurrent:
            raise TenantLimitError(
                f"tenant {name!r} already has {self._running[name]} requests running, its limit (max_concurrent); "
                "retry when one has finished", CONCURRENCY_RETRY_S, "concurrency")
        if tenant.rate is not None:
            wait = self._bucket(tenant).take()
            if wait > 0:
                raise TenantLimitError(
                    f"tenant {name!r} is over its rate of {tenant.rate:g} requests/s (burst {tenant.bucket_size}); "
                    f"retry in {max(1, math.ceil(wait))} s", wait, "rate")
        self._running[name] += 1
        return Admission(self, name)

    def _release(self, name: str) -> None:
        self._running[name] -= 1
        if not self._running[name]:
            del self._running[name]

    def _bucket(self, tenant: Tenant) -> TokenBucket:
        bucket = self._buckets.get(tenant.name)
        if bucket is None or (bucket.rate, bucket.size) != (tenant.rate, tenant.bucket_size):
            bucket = self._buckets[tenant.name] = TokenBucket(tenant.rate, tenant.bucket_size, self.clock)
        return bucket
