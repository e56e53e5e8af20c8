"""Where the preprocessing golden data is: `../shared/golden` beside the repository (the project's shared folder), or
`shared/golden` inside a checkout that carries a copy (a device machine's). The golden files are an independent record
of the original model's preprocessing, so tests read them rather than a copy made by this code."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_CANDIDATES = ((REPO / "../shared/golden").resolve(), REPO / "shared/golden")
GOLDEN = next((p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[0])
