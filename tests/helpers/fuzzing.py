"""What the fuzz tests share: their hypothesis settings (bounded in the suite; `make fuzz` multiplies the examples by
FUZZ_SCALE), and the checks every error a caller gets must pass."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

from helpers.chat import LEAK_MARKERS

# `make fuzz` sets it (the README's Reliability section); the suite runs each fuzz test at its bounded size.
SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
# Random examples on a developer's machine (new inputs every run); a fixed sequence in CI, so that a submission's CI
# fails only for what it changed.
DERANDOMIZE = os.environ.get("CI", "").lower() in ("1", "true")


def examples(count: int) -> int:
    return max(1, round(count * SCALE))


def timeout_s(bounded_s: float) -> float:
    """A fuzz test's time limit: `bounded_s` for the suite's run, in proportion for a longer one."""
    return bounded_s * max(1.0, SCALE)


def fuzz_settings(count: int) -> settings:
    """`count` examples (scaled), no deadline, every health check off (the inputs are large and slow on purpose)."""
    return settings(max_examples=examples(count), deadline=None, derandomize=DERANDOMIZE,
                    suppress_health_check=list(HealthCheck))


def leaks(message: str, sent: str = "") -> list[str]:
    """What of the server's insides `message` shows (tracebacks, source paths, internal addresses), apart from what
    the caller sent itself (an error may quote the caller's input)."""
    return [marker for marker in LEAK_MARKERS if marker in message and marker not in sent]
