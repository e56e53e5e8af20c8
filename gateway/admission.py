"""The gateway's admission control: a bound on the chat requests it works on at once, and who goes first when full.

Every chat request (Chat, each of BatchChat's, the HTTP API's) holds one of `max_in_flight` slots from admission
(after its input is validated) to its last event. Standard and sheddable requests together hold at most
`max_in_flight - critical_reserve` of them, so a critical request finds a slot (and the LLM's batch a row, when the
LLM's --max-batch-size is at least `max_in_flight`) even while the others fill their share. While a slot it may
take is free and nobody of its priority or a more important one waits, a request takes it at once. Otherwise
(saturated for it), its priority decides (services.contract.priority):

- `sheddable` is refused at once: `ShedError` (UNAVAILABLE / HTTP 503) with `retry_after_s`, so a caller that can
  wait is told to come back, and one that cannot fails in microseconds rather than after a queue's wait;
- `standard` waits in the queue, up to its deadline or `queue_wait_s`, whichever comes first: past its deadline it is
  `DeadlineExceededError` (it never ran), past `queue_wait_s` a `ShedError` with `retry_after_s`;
- `critical` waits up to its deadline only, and goes before every standard request in the queue.

A freed slot passes straight to the first waiter: the most important priority first, FIFO within one. The queue
holds at most `max_queued` waiters; when it is full, a newcomer displaces the newest waiter of a lower priority (that
one is shed), or is shed itself if there is none. There is no ageing: a steady stream of critical requests can keep
standard ones waiting until their `queue_wait_s` passes; that is the contract of a priority.

`retry_after_s` estimates when a slot frees up for the refused request: the mean time a slot was held (an
exponentially weighted average) times the queue ahead of it over the slots, between 1 and 60 seconds.

Pure asyncio, no transport: the orchestrator calls `slot`; the metrics are `AdmissionMetrics`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.contract.errors import DeadlineExceededError, ShedError
from services.contract.priority import Priority
from services.runtime.request_metrics import LATENCY_BUCKETS

# The weight of the newest hold time in the average `retry_after_s` is estimated from.
HOLD_WEIGHT = 0.1
RETRY_AFTER_MIN_S = 1.0
RETRY_AFTER_MAX_S = 60.0
# Why a request was refused (the `reason` label of `shed`).
SATURATED, QUEUE_FULL, QUEUE_WAIT, DISPLACED, DEADLINE = "saturated", "queue_full", "queue_wait", "displaced", \
    "deadline"


class AdmissionMetrics:
    """`admitted{priority}`, `shed{priority,reason}`, `queued{priority}` (waiters now), `admission_in_flight` (slots
    taken now) and `admission_wait_seconds{priority}` (time from arrival to a slot, admitted requests only)."""

    def __init__(self, prefix: str, registry: CollectorRegistry):
        r = registry
        self.admitted = Counter(prefix + "admitted", "Chat requests given a slot, by priority", ["priority"],
                                registry=r)
        self.shed = Counter(prefix + "shed", "Chat requests refused by admission control, by priority and reason "
                            "(saturated: sheddable while full; queue_full; queue_wait: waited --queue-wait-s; "
                            "displaced: pushed out of a full queue by a more important one; deadline: its deadline "
                            "passed while it waited)", ["priority", "reason"], registry=r)
        self.queued = Gauge(prefix + "queued", "Chat requests waiting for a slot, by priority", ["priority"],
                            registry=r)
        self.in_flight = Gauge(prefix + "admission_in_flight", "Slots taken (chat requests being worked on)",
                               registry=r)
        self.wait = Histogram(prefix + "admission_wait_seconds", "Time from arrival to a slot, by priority",
                              ["priority"], buckets=LATENCY_BUCKETS, registry=r)
        for priority in Priority:
            self.admitted.labels(priority.label)
            self.queued.labels(priority.label)
            self.wait.labels(priority.label)


@dataclass(eq=False)
class _Waiter:
    priority: Priority
    granted: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Admission:
    """`max_in_flight` slots (`critical_reserve` of them for critical requests only), a queue of at most `max_queued`
    waiters by priority; see the module docstring."""

    def __init__(self, max_in_flight: int, max_queued: int, queue_wait_s: float, critical_reserve: int = 0,
                 metrics: AdmissionMetrics | None = None):
        self.max_in_flight = max_in_flight
        self.critical_reserve = critical_reserve
        self.max_queued = max_queued
        self.queue_wait_s = queue_wait_s
        self.metrics = metrics
        self.in_flight = 0
        self.critical_in_flight = 0
        self._queues: dict[Priority, collections.deque[_Waiter]] = {p: collections.deque() for p in Priority}
        self._hold_s = RETRY_AFTER_MIN_S  # the average time a slot is held

    def queued(self, priority: Priority | None = None) -> int:
        """Waiters now, of one priority or of all."""
        if priority is not None:
            return len(self._queues[priority])
        return sum(len(queue) for queue in self._queues.values())

    @contextlib.asynccontextmanager
    async def slot(self, priority: Priority, deadline: float | None = None) -> AsyncIterator[None]:
        """Holds a slot for the body; `deadline` is a `time.monotonic()` time (None: none). Raises ShedError or
        DeadlineExceededError (see the module docstring) without taking one."""
        arrived = time.monotonic()
        await self._acquire(priority, deadline)
        taken = time.monotonic()
        self._count("admitted", priority)
        if self.metrics is not None:
            self.metrics.wait.labels(priority.label).observe(taken - arrived)
        try:
            yield
        finally:
            held = time.monotonic() - taken
            self._hold_s += HOLD_WEIGHT * (held - self._hold_s)
            self._release(priority)

    def retry_after_s(self) -> float:
        """When a slot is likely free for a request refused now: the average hold times the queue ahead per slot."""
        ahead = (self.queued() + 1) / self.max_in_flight
        return min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, self._hold_s * ahead))

    # -- taking and giving back -----------------------------------------------------------------------------------

    def _room(self, priority: Priority) -> bool:
        """Whether a slot `priority` may take is free (the reserved ones are for critical requests only)."""
        if priority is Priority.CRITICAL:
            return self.in_flight < self.max_in_flight
        others = self.in_flight - self.critical_in_flight
        return self.in_flight < self.max_in_flight and others < self.max_in_flight - self.critical_reserve

    async def _acquire(self, priority: Priority, deadline: float | None) -> None:
        if self._room(priority) and not any(self._queues[p] for p in Priority if p <= priority):
            self._take(priority)
            return
        if priority is Priority.SHEDDABLE:
            raise self._shed(priority, SATURATED, f"the gateway is saturated ({self.in_flight} requests in flight); "
                                                  "sheddable requests are refused until it is not")
        if self.queued() >= self.max_queued and not self._displace(priority):
            raise self._shed(priority, QUEUE_FULL, f"the gateway is saturated and its queue is full "
                                                   f"({self.max_queued} waiting)")
        waiter = _Waiter(priority)
        self._queues[priority].append(waiter)
        self._gauge(priority)
        limits = [] if deadline is None else [deadline - time.monotonic()]
        if priority is not Priority.CRITICAL:
            limits.append(self.queue_wait_s)
        timeout = max(0.0, min(limits)) if limits else None
        try:
            await asyncio.wait_for(asyncio.shield(waiter.granted), timeout)
        except TimeoutError:
            self._forget(waiter)
            if waiter.granted.done() and waiter.granted.exception() is None:
                return  # granted as the wait ran out: the slot is ours
            if deadline is not None and time.monotonic() >= deadline:
                self._count("shed", priority, DEADLINE)
                raise DeadlineExceededError("the request's deadline passed while it waited for a slot in the "
                                            "gateway (saturated); nothing of it ran") from None
            raise self._shed(priority, QUEUE_WAIT, f"the gateway is saturated: no slot freed within "
                                                   f"{self.queue_wait_s:g} s (--queue-wait-s)") from None
        except asyncio.CancelledError:  # the caller went away
            self._forget(waiter)
            if waiter.granted.done() and not waiter.granted.cancelled() and waiter.granted.exception() is None:
                self._release(priority)  # granted just before: pass it on
            raise

    def _take(self, priority: Priority) -> None:
        self.in_flight += 1
        self.critical_in_flight += priority is Priority.CRITICAL
        if self.metrics is not None:
            self.metrics.in_flight.set(self.in_flight)

    def _release(self, priority: Priority) -> None:
        """Gives the slot back, straight to the first waiter (most important priority first, FIFO within one)."""
        self.in_flight -= 1
        self.critical_in_flight -= priority is Priority.CRITICAL
        waiter = self._next_waiter()
        if waiter is not None:
            self._take(waiter.priority)
            waiter.granted.set_result(None)
        if self.metrics is not None:
            self.metrics.in_flight.set(self.in_flight)

    def _next_waiter(self) -> _Waiter | None:
        for priority in Priority:
            queue = self._queues[priority]
            while queue and self._room(priority):
                waiter = queue.popleft()
                self._gauge(priority)
                if not waiter.granted.done():
                    return waiter
        return None

    def _displace(self, priority: Priority) -> bool:
        """Makes room in the full queue for `priority` by shedding the newest waiter of the least important priority
        below it; False when there is none."""
        for lower in reversed(Priority):
            if lower <= priority:
                return False
            queue = self._queues[lower]
            if queue:
                waiter = queue.pop()
                self._gauge(lower)
                waiter.granted.set_exception(self._shed(lower, DISPLACED, "the gateway is saturated and a more "
                                                                          "important request took this one's place "
                                                                          "in its queue"))
                return True
        return False

    def _forget(self, waiter: _Waiter) -> None:
        with contextlib.suppress(ValueError):
            self._queues[waiter.priority].remove(waiter)
        self._gauge(waiter.priority)

    # -- refusals and metrics -------------------------------------------------------------------------------------

    def _shed(self, priority: Priority, reason: str, why: str) -> ShedError:
        self._count("shed", priority, reason)
        retry = self.retry_after_s()
        return ShedError(f"{why}; retry after {retry:.0f} s (priority {priority.label})", retry_after_s=retry)

    def _count(self, what: str, priority: Priority, reason: str = "") -> None:
        """Counts an admission (`what` "admitted") or a refusal ("shed", with its reason)."""
        if self.metrics is None:
            return
        if what == "admitted":
            self.metrics.admitted.labels(priority.label).inc()
        else:
            self.metrics.shed.labels(priority.label, reason).inc()

    def _gauge(self, priority: Priority) -> None:
        if self.metrics is not None:
            self.metrics.queued.labels(priority.label).set(len(self._queues[priority]))
