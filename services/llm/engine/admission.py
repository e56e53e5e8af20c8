"""Which waiting requests start: by the KV memory they will hold at their longest, and by batch size.

A request's *extent* is its prompt plus its `max_new_tokens`: the most positions its KV can reach. The decode batch
is a padded layout (every row as wide as the widest, plus a few spare columns), so the memory a set of admitted
sequences may come to hold is `rows x (longest extent + spare columns) x bytes per position`; admission keeps that
within the budget, so the KV of running sequences never outgrows it, whatever they generate.

Waiting requests are taken in arrival order. One that does not fit now is passed over, and later ones that fit go
first, but each request can be passed over by at most `max_bypass` later ones; after that nothing behind it starts
until it does (it will: every request fits the budget alone, or `submit` refused it). So a long prompt never blocks
shorter ones behind it while memory is short, and is itself delayed by at most `max_bypass` admissions.

Pure bookkeeping, no torch: the engine calls it on the event loop's thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class Candidate(Protocol):
    extent: int  # prompt + max_new_tokens
    rows: int  # decode rows it will hold: its answers (a request for n answers is admitted as a whole)
    bypassed: int  # later requests admitted before this one


@dataclass(frozen=True)
class Admission:
    budget_bytes: int
    bytes_per_token: int
    max_batch_size: int
    max_bypass: int
    # Columns the decode batch holds beyond its widest row (services.llm.engine.batch.COLUMN_SLACK).
    spare_columns: int = 0

    def cost_bytes(self, extents: Sequence[int]) -> int:
        """What sequences of these extents may come to hold in the padded decode batch."""
        if not extents:
            return 0
        return len(extents) * (max(extents) + self.spare_columns) * self.bytes_per_token

    def fits_alone(self, extent: int, rows: int = 1) -> bool:
        return rows <= self.max_batch_size and self.cost_bytes([extent] * rows) <= self.budget_bytes

    def choose(self, waiting: Sequence[Candidate], admitted: Sequence[int]) -> list[int]:
        """Indices (into `waiting`, in order) of the requests to start now, next to `admitted` (running and
        prefilling sequences' extents). Counts each pass-over in the passed request's `bypassed`."""
        extents = list(admitted)
        chosen: list[int] = []
        passed: list[Candidate] = []
        for index, candidate in enumerate(waiting):
            if len(extents) >= self.max_batch_size:
                break
            rows = [candidate.extent] * candidate.rows
            room = len(extents) + len(rows) <= self.max_batch_size
            if room and self.cost_bytes([*extents, *rows]) <= self.budget_bytes:
                chosen.append(index)
                extents += rows
                for earlier in passed:
                    earlier.bypassed += 1
            elif candidate.bypassed >= self.max_bypass:
                break  # its turn: nothing behind it starts before it
            else:
                passed.append(candidate)
            if any(earlier.bypassed >= self.max_bypass for earlier in passed):
                break
        return chosen
