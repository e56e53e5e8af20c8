"""A circuit breaker per replica: a replica whose calls keep failing or timing out is skipped for a while.

Health checks catch a replica that stops answering them; a breaker catches one that still answers them but fails
its calls (its Redis hangs, its device is wedged) or takes too long to answer them. Per replica:

* CLOSED: calls go to it. `failure_threshold` consecutive failures (UNAVAILABLE, a per-attempt timeout, a Generate
  given up because its replica stopped answering health checks before the first token) open it; any answer resets
  the count.
* OPEN: the router passes it over for the key's next choice, as it does a replica that is not ready. After
  `cooldown_s` it may take one probe call.
* HALF_OPEN: the one probe is in flight; no other call goes to it (for up to `cooldown_s`, then another may probe).
  The probe's success closes the breaker, its failure opens it again for another `cooldown_s`.

An open replica is skipped only while another ready replica's breaker admits calls: when every replica's breaker is
open, calls go to them anyway (as Envoy's panic threshold does), so a caller gets the replicas' own answer (say,
"the embedding cache is unreachable") rather than a blanket "no replica ready", and the first success closes one.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

from services.contract.errors import DeadlineExceededError, InternVLError, NotReadyError


class State(enum.IntEnum):
    """A breaker's state; the value is the `internvl_gateway_endpoint_circuit_state` gauge's."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(frozen=True)
class BreakerSettings:
    failure_threshold: int  # consecutive failures that open a closed breaker
    cooldown_s: float  # seconds an open breaker waits before letting one probe through


class Breaker:
    """The breaker of one replica. `clock` is `time.monotonic` (a fake one in tests)."""

    def __init__(self, settings: BreakerSettings, clock: Callable[[], float] = time.monotonic,
                 on_transition: Callable[[State, State], None] | None = None):
        self.settings = settings
        self.clock = clock
        # Called with (old, new) on every change of state (metrics, logs).
        self.on_transition = on_transition
        self.state = State.CLOSED
        self.failures = 0  # consecutive, while closed
        self.opened_at = 0.0
        self.probe_at = 0.0

    def admits(self) -> bool:
        """Whether a call may go to the replica now: closed, or open past its cool-down (the call becomes the probe
        once `picked`), or half-open with a probe that has given no verdict for a cool-down (a probe routed but never
        made must not keep the replica out for good). Changes nothing."""
        if self.state is State.CLOSED:
            return True
        since = self.opened_at if self.state is State.OPEN else self.probe_at
        return self.clock() - since >= self.settings.cooldown_s

    def picked(self) -> None:
        """A call was routed to the replica: past the cool-down of an open breaker, that call is the probe."""
        if self.state is not State.CLOSED and self.admits():
            self.probe_at = self.clock()
            if self.state is State.OPEN:
                self._move(State.HALF_OPEN)

    def succeeded(self) -> None:
        self.failures = 0
        if self.state is not State.CLOSED:
            self._move(State.CLOSED)

    def failed(self) -> None:
        if self.state is State.CLOSED:
            self.failures += 1
            if self.failures < self.settings.failure_threshold:
                return
        self.failures = 0
        self.opened_at = self.clock()
        if self.state is not State.OPEN:
            self._move(State.OPEN)

    def abandoned(self) -> None:
        """A call ended with no verdict on the replica (its caller cancelled it or ran out of time): a probe's turn
        passes to the next call."""
        if self.state is State.HALF_OPEN:
            self._move(State.OPEN)

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Records the verdict of the call the block makes: NotReadyError (UNAVAILABLE, an attempt that timed out, a
        replica that stopped answering) is a failure; an answer, an error the replica answered with (INVALID_ARGUMENT,
        RESOURCE_EXHAUSTED, ...) included, is a success; the caller's cancel or deadline, or anything else, no
        verdict."""
        try:
            yield
        except NotReadyError:
            self.failed()
            raise
        except DeadlineExceededError:
            self.abandoned()
            raise
        except InternVLError:
            self.succeeded()
            raise
        except (Exception, asyncio.CancelledError, GeneratorExit):
            self.abandoned()
            raise
        self.succeeded()

    def _move(self, state: State) -> None:
        old, self.state = self.state, state
        if self.on_transition is not None:
            self.on_transition(old, state)


class Breakers:
    """The breakers of one pool's replicas, by address, made on first use; `retain` drops removed replicas'."""

    def __init__(self, settings: BreakerSettings, clock: Callable[[], float] = time.monotonic,
                 on_transition: Callable[[str, State, State], None] | None = None):
        self.settings = settings
        self.clock = clock
        # Called with (address, old, new) on every change of state.
        self.on_transition = on_transition
        self._breakers: dict[str, Breaker] = {}

    def __getitem__(self, address: str) -> Breaker:
        breaker = self._breakers.get(address)
        if breaker is None:
            notify = self.on_transition
            breaker = Breaker(self.settings, self.clock,
                              None if notify is None else lambda old, new: notify(address, old, new))
            self._breakers[address] = breaker
        return breaker

    def admitting(self, addresses: Collection[str]) -> set[str]:
        """Those of `addresses` whose breakers admit a call now."""
        return {a for a in addresses if self[a].admits()}

    def state(self, address: str) -> State:
        return self[address].state

    def retain(self, addresses: Collection[str]) -> None:
        """Drops the breakers of replicas no longer in the pool (a replica added again starts closed)."""
        for gone in [a for a in self._breakers if a not in addresses]:
            del self._breakers[gone]
