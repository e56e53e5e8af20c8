"""Which frames of a video InternVL 2.5 looks at.

A port of ``get_index`` from the InternVL 2.5 video recipe: the clip is cut into ``num_segments``
equal segments and the frame nearest the middle of each one is taken. Decoding lives elsewhere; this
is pure arithmetic so the gateway can plan before touching the container.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

# With no bound the original uses +/-1e5 seconds, i.e. "the whole video" for anything under ~28 hours.
_UNBOUNDED = (-100000, 100000)


def frame_indices(
    num_frames: int,
    fps: float,
    num_segments: int,
    bound: Sequence[float] | None = None,
) -> list[int]:
    """Indices (0-based, ascending, ``num_segments`` of them) of the frames to sample.

    ``bound`` is an optional ``(start_s, end_s)`` window in seconds, clamped to the video.
    Rounding is Python's/numpy's round-half-to-even, as the original, so the indices match it exactly.
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, numbers.Integral) or num_frames < 1:
        raise ValueError(f"num_frames must be an integer >= 1, got {num_frames!r}")
    if not (isinstance(fps, numbers.Real) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a finite number > 0, got {fps!r}")
    if isinstance(num_segments, bool) or not isinstance(num_segments, numbers.Integral) or num_segments < 1:
        raise ValueError(f"num_segments must be an integer >= 1, got {num_segments!r}")

    if bound is None:
        start_s, end_s = _UNBOUNDED
    else:
        if len(bound) != 2:
            raise ValueError(f"bound must be (start_seconds, end_seconds), got {bound!r}")
        start_s, end_s = bound
        if not (math.isfinite(start_s) and math.isfinite(end_s)) or start_s > end_s:
            raise ValueError(f"bound must be finite with start <= end, got {bound!r}")

    max_frame = num_frames - 1
    start = max(0, round(start_s * fps))
    end = min(round(end_s * fps), max_frame)
    if start > end:
        # The original would return indices past the end of the video here; refuse instead.
        raise ValueError(
            f"bound {tuple(bound)!r} s lies outside the video ({num_frames} frames at {fps} fps)"
        )
    seg = float(end - start) / num_segments
    # Same expression, same float order as the original: start + seg/2 + round(seg*k), truncated.
    return [int(start + (seg / 2) + np.round(seg * k)) for k in range(num_segments)]
