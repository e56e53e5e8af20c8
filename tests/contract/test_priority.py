"""A request's priority: the header's spelling, the wire's numbers, and the one rule that decides it."""

from __future__ import annotations

import pytest
from internvl.common.v1 import common_pb2

from services.contract.errors import InvalidArgumentError
from services.contract.priority import Priority, effective_priority


def test_the_numbers_are_the_protos_and_lower_is_more_important():
    assert {p.name: int(p) for p in Priority} == {
        name.removeprefix("PRIORITY_"): number for name, number in common_pb2.Priority.items() if number}
    assert Priority.CRITICAL < Priority.STANDARD < Priority.SHEDDABLE


@pytest.mark.parametrize(("text", "priority"), [("critical", Priority.CRITICAL), (" Standard ", Priority.STANDARD),
                                                ("SHEDDABLE", Priority.SHEDDABLE)])
def test_a_header_names_a_priority_in_any_case(text, priority):
    assert Priority.parse(text) is priority


@pytest.mark.parametrize("text", ["", "high", "1", "critical,standard"])
def test_anything_else_is_refused_naming_the_allowed_values(text):
    with pytest.raises(InvalidArgumentError, match="use one of critical, standard, sheddable"):
        Priority.parse(text)


def test_the_wire_value_zero_leaves_it_to_the_default_and_an_unknown_one_is_refused():
    assert Priority.from_pb(0) is None and Priority.from_pb(3) is Priority.SHEDDABLE
    assert Priority.SHEDDABLE.to_pb() == common_pb2.PRIORITY_SHEDDABLE
    with pytest.raises(InvalidArgumentError, match="priority 7 is not a priority"):
        Priority.from_pb(7)


def test_the_request_wins_then_the_tenant_then_the_flag():
    c, s, x = Priority.CRITICAL, Priority.STANDARD, Priority.SHEDDABLE
    assert effective_priority(c, x, s) is c
    assert effective_priority(None, x, s) is x
    assert effective_priority(None, None, s) is s
