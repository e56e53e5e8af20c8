"""The result model: samples over repeats, comparisons of ours against a baseline with a target, scenarios.

A `Measure` is one quantity sampled once per repeat. A `Comparison` puts ours beside a baseline (the transformers
path, a cache miss, a machine floor...) and derives the ratio ours/baseline and the factor by which ours is better;
its `Target` says what the issue asks for. Everything serialises to plain JSON.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Measure:
    """One quantity, one sample per repeat."""

    label: str
    unit: str
    samples: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.samples.append(float(value))

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    def summary(self) -> dict[str, Any]:
        s = self.samples
        return {
            "label": self.label,
            "unit": self.unit,
            "samples": s,
            "n": len(s),
            "median": self.median,
            "mean": statistics.fmean(s) if s else math.nan,
            "min": min(s) if s else math.nan,
            "max": max(s) if s else math.nan,
            "stdev": statistics.stdev(s) if len(s) > 1 else 0.0,
        }


@dataclass(frozen=True)
class Target:
    """What the issue asks for, on the ratio ours/baseline: `max_ratio` (ours at most this times the baseline) or
    `min_ratio` (ours at least this times the baseline)."""

    text: str
    max_ratio: float | None = None
    min_ratio: float | None = None

    def met(self, ratio: float) -> bool | None:
        if math.isnan(ratio):
            return None
        if self.max_ratio is not None and ratio > self.max_ratio:
            return False
        if self.min_ratio is not None and ratio < self.min_ratio:
            return False
        return self.max_ratio is not None or self.min_ratio is not None


@dataclass
class Comparison:
    """Ours against a baseline. `higher_is_better` for throughputs; lower for latencies and memory."""

    name: str
    ours: Measure
    baseline: Measure
    higher_is_better: bool = False
    target: Target | None = None
    note: str = ""
    # False where the baseline is a yardstick (a floor, the weights' size) rather than a competitor.
    competitive: bool = True

    @property
    def ratio(self) -> float:
        """ours / baseline, of the medians."""
        b = self.baseline.median
        return self.ours.median / b if b and not math.isnan(b) else math.nan

    @property
    def better_by(self) -> float:
        """How many times better ours is (>1: better), whichever direction is better."""
        r = self.ratio
        if math.isnan(r) or r == 0:
            return math.nan
        return r if self.higher_is_better else 1.0 / r

    def ratio_range(self) -> tuple[float, float]:
        """The ratio's spread: worst and best pairing of the samples' extremes."""
        o, b = self.ours.samples, self.baseline.samples
        if not o or not b or min(b) == 0:
            return math.nan, math.nan
        return min(o) / max(b), max(o) / min(b)

    def to_dict(self) -> dict[str, Any]:
        low, high = self.ratio_range()
        return {
            "name": self.name,
            "ours": self.ours.summary(),
            "baseline": self.baseline.summary(),
            "ratio_ours_over_baseline": self.ratio,
            "ratio_range": [low, high],
            "better_by": self.better_by,
            "higher_is_better": self.higher_is_better,
            "target": None if self.target is None else {
                "text": self.target.text, "max_ratio": self.target.max_ratio, "min_ratio": self.target.min_ratio},
            "met": None if self.target is None else self.target.met(self.ratio),
            "note": self.note,
            "competitive": self.competitive,
        }


@dataclass
class Scenario:
    number: int
    title: str
    setup: str
    comparisons: list[Comparison] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "title": self.title, "setup": self.setup,
                "comparisons": [c.to_dict() for c in self.comparisons], "extra": self.extra}

    def has_numbers(self) -> bool:
        return bool(self.comparisons) and all(
            c.ours.samples and c.baseline.samples and not math.isnan(c.ratio) for c in self.comparisons)
