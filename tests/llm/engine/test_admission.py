"""Admission by memory and batch size, with a bounded bypass (pure bookkeeping, hand-computed cases)."""

from __future__ import annotations

from dataclasses import dataclass

from services.llm.engine.admission import Admission


@dataclass(eq=False)
class Req:
    extent: int
    rows: int = 1
    bypassed: int = 0


def policy(budget_tokens: int, max_batch_size: int = 8, max_bypass: int = 2) -> Admission:
    return Admission(budget_bytes=budget_tokens * 10, bytes_per_token=10, max_batch_size=max_batch_size,
                     max_bypass=max_bypass, spare_columns=4)


def test_cost_is_the_padded_batch():
    a = policy(1000)
    assert a.cost_bytes([]) == 0
    assert a.cost_bytes([10, 30, 20]) == 3 * (30 + 4) * 10
    assert a.fits_alone(996) and not a.fits_alone(997)


def test_in_order_while_they_fit_and_the_batch_has_room():
    a = policy(100, max_batch_size=3)
    waiting = [Req(16), Req(16), Req(16), Req(16)]
    assert a.choose(waiting, admitted=[]) == [0, 1, 2]  # (16 + 4) x 3 = 60 tokens; the 4th: batch size
    assert a.choose(waiting, admitted=[46]) == [0]  # (46 + 4) x 2 = 100 fits, x 3 = 150 does not


def test_a_long_request_is_passed_over_at_most_max_bypass_times():
    a = policy(100, max_bypass=2)
    long, shorts = Req(96), [Req(6) for _ in range(4)]
    waiting = [long, *shorts]
    # With one short one running, the long one cannot fit; two later ones pass it, then nothing more does.
    assert a.choose(waiting, admitted=[6]) == [1, 2]
    assert long.bypassed == 2
    assert a.choose([long, *shorts[2:]], admitted=[6]) == []  # its turn: the others wait behind it
    assert a.choose([long, *shorts[2:]], admitted=[]) == [0]  # alone it fits; the shorts would not fit beside it
    assert all(s.bypassed == 0 for s in shorts)


def test_nothing_fits_nothing_is_chosen():
    a = policy(50)
    assert a.choose([Req(40)], admitted=[10]) == []


def test_a_request_for_n_answers_is_admitted_as_n_rows_or_not_at_all():
    a = policy(100, max_batch_size=4)
    assert a.fits_alone(21, rows=4) and not a.fits_alone(22, rows=4)  # 4 x (21 + 4) = 100
    assert not a.fits_alone(1, rows=5)  # more answers than the batch has rows
    three, one = Req(16, rows=3), Req(16)
    assert a.choose([three, one], admitted=[]) == [0, 1]  # 4 rows x 20 = 80
    assert a.choose([three, one], admitted=[16]) == [0]  # the batch is full after the three
    assert a.choose([three, one], admitted=[16, 16]) == [1]  # 3 more rows would exceed the batch size
    assert three.bypassed == 1
