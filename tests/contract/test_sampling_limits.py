"""The request limits of sampling parameters and constraints (`SamplingLimits`): at a limit is taken, one above it is
refused naming the field, the limit and its flag; the defaults are those the limits had before they were flags."""

from __future__ import annotations

import pytest

from services.contract.constraint import Constraint, ConstraintKind, ConstraintLimits
from services.contract.errors import InvalidArgumentError
from services.contract.sampling import SamplingLimits, SamplingParams

LIMITS = SamplingLimits(max_n=2, max_logit_bias=3, max_stop_strings=2, max_stop_string_chars=5,
                        constraint=ConstraintLimits(max_constraint_chars=10, max_constraint_choices=2))

# (field, at the limit, above it, the refusal)
CASES = [
    ("n", {"n": 2}, {"n": 3}, r"^n must be between 1 and 2 \(--max-n\), got 3$"),
    ("logit_bias", {"logit_bias": ((1, 1.0), (2, 1.0), (3, 1.0))},
     {"logit_bias": ((1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0))},
     r"^logit_bias may have at most 3 entries \(--max-logit-bias\), got 4$"),
    ("stop_strings", {"stop_strings": ("a", "b")}, {"stop_strings": ("a", "b", "c")},
     r"^at most 2 stop strings \(--max-stop-strings\), got 3$"),
    ("stop string length", {"stop_strings": ("abcde",)}, {"stop_strings": ("abcdef",)},
     r"^each stop string may have at most 5 characters \(--max-stop-string-chars\), got 6$"),
    ("constraint size", {"constraint": Constraint(ConstraintKind.REGEX, pattern="a" * 10)},
     {"constraint": Constraint(ConstraintKind.REGEX, pattern="a" * 11)},
     r"^the constraint is larger than 10 characters \(--max-constraint-chars\), got 11$"),
    ("choices", {"constraint": Constraint(ConstraintKind.CHOICE, choices=("a", "b"))},
     {"constraint": Constraint(ConstraintKind.CHOICE, choices=("a", "b", "c"))},
     r"^choice: at most 2 choices \(--max-constraint-choices\), got 3$"),
]


@pytest.mark.parametrize(("name", "at", "above", "message"), CASES, ids=[c[0] for c in CASES])
def test_at_the_limit_is_taken_above_is_refused_naming_the_flag(name, at, above, message):
    SamplingParams(**at).validate(LIMITS)
    with pytest.raises(InvalidArgumentError, match=message):
        SamplingParams(**above).validate(LIMITS)
    SamplingParams(**above).validate()  # within the defaults


def test_the_defaults_are_the_former_fixed_limits():
    assert (SamplingLimits().max_n, SamplingLimits().max_logit_bias, SamplingLimits().max_stop_strings,
            SamplingLimits().max_stop_string_chars) == (16, 300, 16, 256)
    assert (ConstraintLimits().max_constraint_chars, ConstraintLimits().max_constraint_choices) == (64 * 1024, 1024)
    with pytest.raises(InvalidArgumentError, match=r"n must be between 1 and 16"):
        SamplingParams(n=17).validate()
    with pytest.raises(InvalidArgumentError, match=r"^n must be between 1 and 16 \(--max-n\), got -1$"):
        SamplingParams(n=-1).validate()


def test_limits_below_one_are_problems_naming_the_flag():
    bad = SamplingLimits(max_n=0, constraint=ConstraintLimits(max_constraint_chars=0))
    assert bad.problems() == ["--max-n must be >= 1, got 0", "--max-constraint-chars must be >= 1, got 0"]
    assert SamplingLimits().problems() == []
