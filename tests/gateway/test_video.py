"""Video frame sampling (InternVL 2.5 ``get_index``) against the shared golden file."""

from __future__ import annotations

import json

import pytest
from golden import GOLDEN

from gateway.video import frame_indices

CASES = json.loads((GOLDEN / "video_frames_public.json").read_text())["cases"]


def _case_id(c: dict) -> str:
    window = "all" if c["bound_seconds"] is None else "{}-{}s".format(*c["bound_seconds"])
    return f"{c['num_frames']}f@{c['fps']}fps-{c['num_segments']}seg-{window}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_frame_indices_match_golden(case):
    got = frame_indices(case["num_frames"], case["fps"], case["num_segments"], case["bound_seconds"])
    assert got == case["frame_indices"]
    assert all(isinstance(i, int) for i in got)
    assert all(0 <= i < case["num_frames"] for i in got)


def test_round_half_to_even():
    # 5 frames in 8 segments: seg = 0.5, so seg*k hits .5 and the rounding mode shows.
    # Half-to-even rounds 0.5 -> 0 and 2.5 -> 2; half-up would give [0, 1, 1, 2, 2, 3, 3, 4].
    assert frame_indices(5, 10.0, 8) == [0, 0, 1, 2, 2, 2, 3, 4]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_frames": 0, "fps": 30.0, "num_segments": 8}, "num_frames"),
        ({"num_frames": -5, "fps": 30.0, "num_segments": 8}, "num_frames"),
        ({"num_frames": 10.5, "fps": 30.0, "num_segments": 8}, "num_frames"),
        ({"num_frames": 100, "fps": 0.0, "num_segments": 8}, "fps"),
        ({"num_frames": 100, "fps": -24.0, "num_segments": 8}, "fps"),
        ({"num_frames": 100, "fps": float("nan"), "num_segments": 8}, "fps"),
        ({"num_frames": 100, "fps": float("inf"), "num_segments": 8}, "fps"),
        ({"num_frames": 100, "fps": 30.0, "num_segments": 0}, "num_segments"),
        ({"num_frames": 100, "fps": 30.0, "num_segments": 8, "bound": (1.0,)}, "bound"),
        ({"num_frames": 100, "fps": 30.0, "num_segments": 8, "bound": (3.0, 1.0)}, "bound"),
        ({"num_frames": 100, "fps": 30.0, "num_segments": 8, "bound": (0.0, float("inf"))}, "bound"),
        # Starts at frame 300 of a 100-frame video.
        ({"num_frames": 100, "fps": 30.0, "num_segments": 8, "bound": (10.0, 20.0)}, "outside the video"),
    ],
    ids=[
        "zero-frames",
        "negative-frames",
        "fractional-frames",
        "zero-fps",
        "negative-fps",
        "nan-fps",
        "inf-fps",
        "zero-segments",
        "bound-one-value",
        "bound-reversed",
        "bound-infinite",
        "bound-past-end",
    ],
)
def test_frame_indices_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        frame_indices(**kwargs)
