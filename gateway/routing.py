"""Which replica a call goes to: rendezvous hashing with a load bound, and failover down the key's preference list.

Every gateway replica computes the same preference list for a key from the same endpoint addresses (the score of an
endpoint is a hash of the key and its address), so the calls of one conversation, or of one image, reach the same
replica from any gateway. Adding or removing one of N endpoints moves only the keys whose first choice it is: about
1/N of them. An endpoint whose in-flight load would exceed the bound of consistent hashing with bounded loads
(Mirrokni, Thorup and Zadimoghaddam, 2016), ceil((1 + epsilon) x the mean load counting this call), plus a slack of
one call, is passed over for the key's next choice, so a hot key cannot pile its traffic onto one replica. The slack
matters at small loads, where the bare bound is 1 until a third of the pool is busy: passing a conversation over for
carrying one call more than its share costs a full prefill elsewhere (and its next turn a second one, back at its
first choice), far more than waiting for that one call.

The load is this gateway's own count of calls in flight per endpoint. Each gateway replica keeps its own share of the
traffic within the bound, so the sum over gateways is within it too, with no extra calls, no load reports that age
between two reads, and nothing to agree on; a load report from the replicas would see other gateways' calls too but
only as fresh as its last poll, which matters most exactly when a burst arrives.
"""

from __future__ import annotations

import collections
import enum
import hashlib
import itertools
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.circuit import Breakers
from services.contract.errors import NotReadyError


class Reason(enum.Enum):
    """Why the chosen endpoint was chosen (the `reason` label of the routing metric)."""

    AFFINITY = "affinity"  # the key's first choice
    OVERLOAD = "overload"  # an earlier choice was over the load bound
    FAILOVER = "failover"  # an earlier choice was not ready, or failed this call already
    ROUND_ROBIN = "round_robin"  # --llm-routing round_robin: the next ready endpoint in turn


class Policy(enum.Enum):
    AFFINITY = "affinity"
    ROUND_ROBIN = "round_robin"


@dataclass(frozen=True)
class Choice:
    address: str
    reason: Reason


def _score(key: bytes, address: str) -> int:
    digest = hashlib.blake2b(address.encode() + b"\0" + key, digest_size=8, person=b"internvl-route").digest()
    return int.from_bytes(digest, "big")


def preference(key: bytes, addresses: Collection[str]) -> list[str]:
    """`addresses` in the order `key` prefers them (highest rendezvous score first; ties by address)."""
    return sorted(addresses, key=lambda address: (-_score(key, address), address))


# Keys moved off their first choice by the load bound that a router remembers (least recently used out).
DIVERTED_KEYS = 100_000
# Calls an endpoint may carry beyond the bound of bounded-load hashing (see the module docstring).
LOAD_SLACK = 1


def load_bound(loads: Mapping[str, int], epsilon: float) -> int:
    """The most calls an endpoint may carry after taking one more: ceil((1 + epsilon) x mean) + `LOAD_SLACK`, the
    mean counting the new call.

    Some endpoint always has room: the least loaded carries at most floor((total - 1) / n) <= ceil(mean) - 1.
    """
    if not loads:
        return 0
    return math.ceil((1 + epsilon) * (sum(loads.values()) + 1) / len(loads)) + LOAD_SLACK


def choose(key: bytes, ready: Mapping[str, int], known: Collection[str], epsilon: float,
           exclude: Collection[str] = ()) -> Choice | None:
    """The endpoint for `key`: the first of its preference list that is ready, not excluded and within the bound.

    `ready` maps each ready endpoint to its calls in flight; `known` is every endpoint, ready or not, so that the
    preference list (and so the reason) does not depend on which ones are up; `exclude` holds endpoints this call
    already failed on. None when no endpoint is ready.
    """
    candidates = {address: load for address, load in ready.items() if address not in exclude}
    if not candidates:
        return None
    bound = load_bound(candidates, epsilon)
    passed: Reason | None = None
    for address in preference(key, {*known, *candidates}):
        if address not in candidates:
            passed = passed or Reason.FAILOVER
        elif candidates[address] + 1 > bound:
            passed = passed or Reason.OVERLOAD
        else:
            return Choice(address, passed or Reason.AFFINITY)
    # Unreachable by the bound's construction; kept so a float rounding can never leave a call unrouted.
    return Choice(min(candidates, key=lambda a: (candidates[a], a)), Reason.OVERLOAD)


class RoundRobin:
    """The next ready endpoint in address order, skipping excluded ones (the `round_robin` policy)."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, ready: Sequence[str], exclude: Collection[str] = ()) -> Choice | None:
        candidates = sorted(a for a in ready if a not in exclude)
        if not candidates:
            return None
        return Choice(candidates[next(self._counter) % len(candidates)],
                      Reason.ROUND_ROBIN if not exclude else Reason.FAILOVER)


class Pool(Protocol):
    """What a `Router` reads of an endpoint pool (`gateway.endpoints.EndpointPool`)."""

    endpoints: Mapping[str, object]

    def ready_loads(self) -> dict[str, int]: ...

    def unavailable(self, what: str) -> NotReadyError: ...


class Router:
    """Picks a replica of one pool for each call under the configured policy, and reports why (for metrics).

    A key that the load bound moved off its first choice keeps going where it went, while that replica is ready and
    within the bound: its latest prefix is there now, and its first choice holds at most an older one. Back at its
    first choice (that replica has room again, or the one it moved to has none), it is forgotten. A key moved by a
    failover is not remembered, so when its first choice is back it returns there. The memory is this gateway's own
    and bounded (`DIVERTED_KEYS`, least recently used out); another gateway without it routes the key by hashing.

    With `breakers`, a ready replica whose circuit breaker is open is passed over like one that is not ready, while
    some other ready replica's breaker admits calls (see `gateway.circuit`); its keys come back once it closes.
    """

    def __init__(self, pool: Pool, what: str, policy: Policy, epsilon: float,
                 record: Callable[[Reason], None] | None = None, breakers: Breakers | None = None):
        self.pool = pool
        self.what = what
        self.policy = policy
        self.epsilon = epsilon
        self.record = record
        self.breakers = breakers
        self._round_robin = RoundRobin()
        self._diverted: collections.OrderedDict[bytes, str] = collections.OrderedDict()

    def pick(self, key: bytes | None, exclude: Collection[str] = ()) -> str:
        """The replica for a call routed by `key` (None: no affinity), avoiding `exclude` while others are ready.

        Raises the pool's `NotReadyError` when no replica is ready.
        """
        choice = self._choose(key, exclude) or (self._choose(key, ()) if exclude else None)
        if choice is None:
            raise self.pool.unavailable(self.what)
        if key is not None and self.policy is Policy.AFFINITY:
            self._remember(key, choice)
        if self.breakers is not None:
            self.breakers[choice.address].picked()
        if self.record is not None:
            self.record(choice.reason)
        return choice.address

    def preferred(self, key: bytes) -> str | None:
        """Where `key` would go now (None: nothing is ready); records nothing."""
        choice = self._choose(key, ())
        return None if choice is None else choice.address

    def _ready(self, exclude: Collection[str]) -> dict[str, int]:
        """The pool's ready replicas and their loads, less those whose breaker is open unless every one not in
        `exclude` is."""
        ready = self.pool.ready_loads()
        if self.breakers is None:
            return ready
        self.breakers.retain(self.pool.endpoints)  # a replica removed and added again starts closed
        admitting = self.breakers.admitting([a for a in ready if a not in exclude])
        if not admitting:
            return ready
        return {a: load for a, load in ready.items() if a in admitting or a in exclude}

    def _choose(self, key: bytes | None, exclude: Collection[str]) -> Choice | None:
        ready = self._ready(exclude)
        if key is None or self.policy is Policy.ROUND_ROBIN:
            return self._round_robin.choose(list(ready), exclude)
        moved_to = self._diverted.get(key)
        if moved_to is not None and moved_to in ready and moved_to not in exclude:
            candidates = {a: load for a, load in ready.items() if a not in exclude}
            if candidates[moved_to] + 1 <= load_bound(candidates, self.epsilon):
                return Choice(moved_to, Reason.AFFINITY)
        return choose(key, ready, self.pool.endpoints.keys(), self.epsilon, exclude)

    def _remember(self, key: bytes, choice: Choice) -> None:
        if choice.reason is Reason.OVERLOAD or (choice.reason is Reason.AFFINITY and key in self._diverted
                                                 and self._diverted[key] == choice.address):
            self._diverted[key] = choice.address
            self._diverted.move_to_end(key)
            while len(self._diverted) > DIVERTED_KEYS:
                self._diverted.popitem(last=False)
        else:
            self._diverted.pop(key, None)
