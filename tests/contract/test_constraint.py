"""The checks of a constraint before it is compiled: every refusal is the caller's InvalidArgumentError, the schema's
nesting included (the gateway and the LLM service both run them, on input from either API)."""

from __future__ import annotations

import pytest

from services.contract.constraint import Constraint, ConstraintKind
from services.contract.errors import InvalidArgumentError

CASES = [
    (Constraint(ConstraintKind.JSON_SCHEMA, schema="{"), "json_schema: the schema is not valid JSON"),
    (Constraint(ConstraintKind.JSON_SCHEMA, schema="[1]"), "json_schema: a schema must be a JSON object"),
    # 30 000 nested arrays fit in the 64 KiB limit; Python's parser gives up long before (RecursionError).
    (Constraint(ConstraintKind.JSON_SCHEMA, schema="[" * 30_000 + "]" * 30_000),
     "json_schema: the schema is nested too deeply to parse"),
    (Constraint(ConstraintKind.REGEX, pattern=""), "regex: the pattern is empty"),
    (Constraint(ConstraintKind.CHOICE, choices=("a", "")), "choice: a choice is an empty string"),
]


@pytest.mark.parametrize(("constraint", "message"), CASES, ids=[m.split(" (")[0] for _, m in CASES])
def test_refusals_are_invalid_argument(constraint, message):
    with pytest.raises(InvalidArgumentError) as info:
        constraint.validate()
    assert str(info.value).startswith(message), info.value


def test_a_deep_but_parseable_schema_passes():
    Constraint(ConstraintKind.JSON_SCHEMA, schema='{"items":' * 50 + "{}" + "}" * 50).validate()
