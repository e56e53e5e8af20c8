"""The gateway's admission control on its own: slots, the priority queue, shedding, deadlines and the metrics."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time

import pytest
from prometheus_client import CollectorRegistry

from gateway.admission import Admission, AdmissionMetrics
from gateway.config import GatewayConfig, add_arguments
from services.contract.errors import DeadlineExceededError, InvalidArgumentError, ShedError
from services.contract.priority import Priority

pytestmark = [pytest.mark.timeout(30)]
C, S, X = Priority.CRITICAL, Priority.STANDARD, Priority.SHEDDABLE


def make(max_in_flight: int = 1, max_queued: int = 10, queue_wait_s: float = 10.0,
         critical_reserve: int = 0) -> Admission:
    return Admission(max_in_flight, max_queued, queue_wait_s, critical_reserve,
                     AdmissionMetrics("t_", CollectorRegistry()))


def sample(admission: Admission, name: str, *labels: str) -> float:
    metric = getattr(admission.metrics, name)
    return (metric.labels(*labels) if labels else metric)._value.get()


class Holder:
    """Takes a slot in a task of its own and keeps it until `release()`; `order` records who got a slot when."""

    def __init__(self, admission: Admission, priority: Priority, name: str, order: list[str],
                 deadline: float | None = None):
        self.release = asyncio.Event()
        self.error: BaseException | None = None
        self.task = asyncio.ensure_future(self._run(admission, priority, name, order, deadline))

    async def _run(self, admission, priority, name, order, deadline):
        try:
            async with admission.slot(priority, deadline):
                order.append(name)
                await self.release.wait()
        except Exception as exc:  # noqa: BLE001 - the test reads it
            self.error = exc


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_a_free_slot_is_taken_at_once_whatever_the_priority():
    admission = make(max_in_flight=2)
    async with admission.slot(X), admission.slot(S):
        assert admission.in_flight == 2
    assert admission.in_flight == 0
    assert sample(admission, "admitted", "sheddable") == sample(admission, "admitted", "standard") == 1


@pytest.mark.asyncio
async def test_while_saturated_sheddable_is_refused_at_once_with_retry_after():
    admission = make()
    order: list[str] = []
    holder = Holder(admission, S, "first", order)
    await settle()
    started = time.monotonic()
    with pytest.raises(ShedError, match="sheddable requests are refused") as info:
        async with admission.slot(X):
            pass
    assert time.monotonic() - started < 0.5  # fast, not after a wait
    assert info.value.retry_after_s >= 1
    assert sample(admission, "shed", "sheddable", "saturated") == 1 and admission.in_flight == 1
    holder.release.set()
    await holder.task


@pytest.mark.asyncio
async def test_a_freed_slot_goes_to_critical_before_standard_and_fifo_within_a_priority():
    admission = make()
    order: list[str] = []
    first = Holder(admission, S, "first", order)
    await settle()
    waiters = [Holder(admission, p, name, order) for p, name in ((S, "s1"), (C, "c1"), (S, "s2"), (C, "c2"))]
    await settle()
    assert (admission.queued(C), admission.queued(S)) == (2, 2)
    assert sample(admission, "queued", "critical") == 2
    first.release.set()
    for holder in waiters:
        await settle()
        for h in waiters:
            h.release.set()
    await asyncio.gather(first.task, *(h.task for h in waiters))
    assert order == ["first", "c1", "c2", "s1", "s2"]
    assert admission.in_flight == 0 and admission.queued() == 0


@pytest.mark.asyncio
async def test_a_standard_request_waits_at_most_queue_wait_s_then_is_shed():
    admission = make(queue_wait_s=0.2)
    order: list[str] = []
    holder = Holder(admission, S, "first", order)
    await settle()
    with pytest.raises(ShedError, match="no slot freed within 0.2 s") as info:
        async with admission.slot(S, time.monotonic() + 10):
            pass
    assert info.value.retry_after_s is not None and admission.queued() == 0
    assert sample(admission, "shed", "standard", "queue_wait") == 1
    holder.release.set()
    await holder.task


@pytest.mark.asyncio
async def test_a_waiter_whose_deadline_passes_is_deadline_exceeded_and_never_runs():
    admission = make()
    order: list[str] = []
    holder = Holder(admission, S, "first", order)
    await settle()
    late = Holder(admission, C, "late", order, deadline=time.monotonic() + 0.1)
    await asyncio.sleep(0.3)
    await late.task
    assert isinstance(late.error, DeadlineExceededError) and "nothing of it ran" in str(late.error)
    holder.release.set()
    await holder.task
    assert order == ["first"] and sample(admission, "shed", "critical", "deadline") == 1


@pytest.mark.asyncio
async def test_a_full_queue_sheds_the_newest_less_important_waiter_for_a_critical_one():
    admission = make(max_queued=2)
    order: list[str] = []
    first = Holder(admission, S, "first", order)
    await settle()
    s1, s2 = Holder(admission, S, "s1", order), Holder(admission, S, "s2", order)
    await settle()
    with pytest.raises(ShedError, match="queue is full"):
        async with admission.slot(S):
            pass
    critical = Holder(admission, C, "c", order)
    await settle()
    assert isinstance(s2.error, ShedError) and "took this one's place" in str(s2.error)
    assert sample(admission, "shed", "standard", "displaced") == 1
    for holder in (first, s1, critical):
        holder.release.set()
    await asyncio.gather(first.task, s1.task, critical.task, s2.task)
    assert order == ["first", "c", "s1"]


@pytest.mark.asyncio
async def test_a_waiter_that_goes_away_leaves_the_queue_and_the_slot_passes_on():
    admission = make()
    order: list[str] = []
    first = Holder(admission, S, "first", order)
    await settle()
    gone, after = Holder(admission, C, "gone", order), Holder(admission, S, "after", order)
    await settle()
    gone.task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await gone.task
    assert admission.queued() == 1
    first.release.set()
    after.release.set()
    await asyncio.gather(first.task, after.task)
    assert order == ["first", "after"] and admission.in_flight == 0


@pytest.mark.asyncio
async def test_reserved_slots_are_for_critical_requests_only():
    admission = make(max_in_flight=3, critical_reserve=2)
    order: list[str] = []
    first = Holder(admission, S, "first", order)
    await settle()
    with pytest.raises(ShedError):  # one slot for the others, taken
        async with admission.slot(X):
            pass
    waiting = Holder(admission, S, "waiting", order)
    c1, c2 = Holder(admission, C, "c1", order), Holder(admission, C, "c2", order)
    await settle()
    assert order == ["first", "c1", "c2"] and admission.queued(S) == 1
    c1.release.set()
    await c1.task
    await settle()
    assert admission.queued(S) == 1  # a freed reserved slot stays for critical requests
    first.release.set()
    await first.task
    await settle()
    assert order[-1] == "waiting"
    for holder in (c2, waiting):
        holder.release.set()
    await asyncio.gather(c2.task, waiting.task)
    assert admission.in_flight == 0


def _config(*argv: str) -> GatewayConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return GatewayConfig.from_args(parser.parse_args(["--vision-target", "v:1", "--llm-target", "l:1", *argv]), {})


def test_the_admission_flags_and_their_defaults():
    config = _config()
    assert (config.max_in_flight, config.critical_reserve, config.max_queued, config.queue_wait_s,
            config.default_priority) == (64, 8, 256, 30.0, "standard")
    config = _config("--max-in-flight", "4", "--critical-reserve", "0", "--default-priority", "sheddable")
    assert (config.max_in_flight, config.critical_reserve, config.default_priority) == (4, 0, "sheddable")


@pytest.mark.parametrize(("argv", "message"), [
    (["--max-in-flight", "0"], "--max-in-flight must be >= 1, got 0"),
    (["--max-in-flight", "8"], "--critical-reserve must be >= 0 and below --max-in-flight, got 8"),
    (["--critical-reserve", "-1"], "--critical-reserve must be >= 0 and below --max-in-flight, got -1"),
    (["--max-queued", "-1"], "--max-queued must be >= 0, got -1"),
    (["--queue-wait-s", "0"], "--queue-wait-s must be > 0, got 0.0"),
])
def test_the_admission_flags_are_validated(argv, message):
    with pytest.raises(InvalidArgumentError, match=message):
        _config(*argv)


def test_an_unknown_default_priority_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        _config("--default-priority", "urgent")
    assert "invalid choice: 'urgent'" in capsys.readouterr().err
