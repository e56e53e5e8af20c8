"""The per-replica circuit breaker's state machine, on a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from gateway.circuit import Breaker, Breakers, BreakerSettings, State
from gateway.routing import Policy, Reason, Router
from services.contract.errors import DeadlineExceededError, InvalidArgumentError, NotReadyError


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def breaker(clock: Clock, threshold: int = 3, cooldown_s: float = 10.0) -> tuple[Breaker, list]:
    moves: list[tuple[State, State]] = []
    return Breaker(BreakerSettings(threshold, cooldown_s), clock, lambda old, new: moves.append((old, new))), moves


def test_consecutive_failures_open_it_and_a_success_resets_the_count(clock):
    b, moves = breaker(clock, threshold=3)
    b.failed()
    b.failed()
    b.succeeded()  # not consecutive any more
    b.failed()
    b.failed()
    assert b.state is State.CLOSED and b.admits() and moves == []
    b.failed()
    assert b.state is State.OPEN and not b.admits()
    assert moves == [(State.CLOSED, State.OPEN)]


def test_after_the_cooldown_one_probe_half_opens_it_and_its_success_closes_it(clock):
    b, moves = breaker(clock, threshold=1, cooldown_s=10)
    b.failed()
    clock.now += 9.9
    assert not b.admits()
    b.picked()  # a call routed here anyway (every replica open): no probe before the cool-down
    assert b.state is State.OPEN
    clock.now += 0.1
    assert b.admits()
    b.picked()
    assert b.state is State.HALF_OPEN and not b.admits()  # one probe at a time
    b.succeeded()
    assert b.state is State.CLOSED and b.admits()
    assert moves == [(State.CLOSED, State.OPEN), (State.OPEN, State.HALF_OPEN), (State.HALF_OPEN, State.CLOSED)]


def test_a_failed_probe_opens_it_for_another_cooldown(clock):
    b, moves = breaker(clock, threshold=2, cooldown_s=5)
    b.failed()
    b.failed()
    clock.now += 5
    b.picked()
    b.failed()  # one failure is enough while half-open
    assert b.state is State.OPEN
    clock.now += 4.9
    assert not b.admits()
    clock.now += 0.1
    assert b.admits()
    assert moves[-1] == (State.HALF_OPEN, State.OPEN)


def test_an_abandoned_probe_lets_the_next_call_probe(clock):
    b, _ = breaker(clock, threshold=1, cooldown_s=5)
    b.failed()
    clock.now += 5
    b.picked()
    b.abandoned()
    assert b.state is State.OPEN and b.admits()  # no new cool-down: the replica was not found failing


def test_a_probe_without_a_verdict_for_a_cooldown_lets_another_through(clock):
    b, moves = breaker(clock, threshold=1, cooldown_s=5)
    b.failed()
    clock.now += 5
    b.picked()  # routed, but say the call was never made
    clock.now += 4.9
    assert not b.admits()
    clock.now += 0.1
    assert b.admits()
    b.picked()
    assert b.state is State.HALF_OPEN and not b.admits()  # the new probe has its turn
    b.succeeded()
    assert b.state is State.CLOSED
    assert moves.count((State.OPEN, State.HALF_OPEN)) == 1


@pytest.mark.parametrize(("error", "expected"), [
    (NotReadyError("down"), State.OPEN),
    (InvalidArgumentError("bad"), State.CLOSED),  # the replica answered
    (DeadlineExceededError("late"), State.OPEN),  # the caller's deadline: no verdict
    (asyncio.CancelledError(), State.OPEN),
], ids=["not_ready", "invalid_argument", "deadline", "cancelled"])
def test_watching_gives_the_verdict_of_a_probe(clock, error, expected):
    b, _ = breaker(clock, threshold=1, cooldown_s=1)
    b.failed()
    clock.now += 1
    b.picked()
    with pytest.raises(type(error)), b.watching():
        raise error
    assert b.state is expected
    if expected is State.OPEN and not isinstance(error, NotReadyError):
        assert b.admits()  # no verdict: the next call may probe at once


def test_watching_a_call_that_returns_closes_it(clock):
    b, _ = breaker(clock, threshold=1, cooldown_s=1)
    b.failed()
    clock.now += 1
    b.picked()
    with b.watching():
        pass
    assert b.state is State.CLOSED


def test_breakers_by_address(clock):
    moves: list = []
    breakers = Breakers(BreakerSettings(1, 3), clock, lambda *move: moves.append(move))
    breakers["a:1"].failed()
    assert breakers.admitting(["a:1", "b:2"]) == {"b:2"}
    assert moves == [("a:1", State.CLOSED, State.OPEN)]
    breakers.retain(["b:2"])
    assert breakers.state("a:1") is State.CLOSED


# ------------------------------------------------------------------------------------------------ with a router


class _Pool:
    def __init__(self, addresses):
        self.endpoints = dict.fromkeys(addresses)

    def ready_loads(self):
        return dict.fromkeys(self.endpoints, 0)

    def unavailable(self, what):
        return NotReadyError(f"no {what} replica ready")


TWO = ["10.0.0.1:50053", "10.0.0.2:50053"]


def test_the_router_skips_an_open_replica_and_gives_its_keys_back_once_a_probe_succeeds(clock):
    reasons = []
    breakers = Breakers(BreakerSettings(1, 5), clock)
    router = Router(_Pool(TWO), "LLM", Policy.AFFINITY, 0.25, record=reasons.append, breakers=breakers)
    keys = [f"conversation-{i}".encode() for i in range(40)]
    home = {key: router.pick(key) for key in keys}
    mine = [key for key in keys if home[key] == TWO[0]]
    assert mine and len(mine) < len(keys)  # both replicas have keys
    breakers[TWO[0]].failed()
    reasons.clear()
    assert {router.pick(key) for key in mine} == {TWO[1]}
    assert set(reasons) == {Reason.FAILOVER}
    clock.now += 5
    assert router.pick(mine[0]) == TWO[0]  # the probe
    assert breakers.state(TWO[0]) is State.HALF_OPEN
    assert router.pick(mine[1]) == TWO[1]  # nothing else while it is in flight
    breakers[TWO[0]].succeeded()
    assert all(router.pick(key) == home[key] for key in keys)


def test_with_every_breaker_open_calls_still_go_somewhere(clock):
    breakers = Breakers(BreakerSettings(1, 5), clock)
    router = Router(_Pool(TWO), "LLM", Policy.AFFINITY, 0.25, breakers=breakers)
    key = b"conversation-0"
    home = router.pick(key)
    for address in TWO:
        breakers[address].failed()
    assert router.pick(key) == home  # its own first choice, not an error
    other = next(a for a in TWO if a != home)
    assert router.pick(key, exclude={home}) == other
