"""Synthetic, seeded inputs: images and videos whose content differs per seed, so every "cold" request really
misses every cache, and the same seed gives ours and the baseline the very same bytes.

Seeds are namespaced per scenario (`seed(scenario, repeat, index)`) so no two scenarios share an image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np
import torch
from PIL import Image

from gateway.video import frame_indices
from services.vision.preprocess import load_image

QUESTIONS = ("Describe the image in detail.", "What colours stand out?", "Is there any text in it?")
VIDEO_QUESTION = "What happens in the video?"
DECODE_PROMPT = "Write a long story about a lighthouse keeper."
VIDEO_FPS = 8


def seed(scenario: int, repeat: int, index: int = 0) -> int:
    return scenario * 1_000_000 + repeat * 1_000 + index


# Scenario 9's request kinds: the number of images a request carries.
ARRIVAL_KINDS = ("text-only", "one image", "two images")
# The seed index of scenario 9's generator; its images take the indices below (2 per request and rate).
ARRIVAL_RNG_INDEX = 999
# The repeat slot of scenario 9's calibration requests (no benchmark runs 999 repeats).
CALIBRATION_REPEAT = 999


@dataclass(frozen=True)
class ArrivalRequest:
    """One request of scenario 9: when it arrives (seconds after the run's first arrival), what it asks."""

    index: int
    arrival_s: float
    images: tuple[bytes, ...]
    question: str
    max_new_tokens: int

    @property
    def kind(self) -> str:
        return ARRIVAL_KINDS[len(self.images)]


def arrival_requests(repeat: int, load_index: int, n: int, rate: float, mix: tuple[float, ...],
                     lengths: tuple[int, ...], side: int) -> list[ArrivalRequest]:
    """`n` requests with Poisson arrivals at `rate` per second (the first at 0).

    One generator per repeat (seed namespace 9) draws the unit-rate exponential gaps, each request's kind (`mix`:
    probabilities of 0, 1 and 2 images) and max_new_tokens (uniform over `lengths`), so every rate of a repeat
    serves the same sequence of requests with its gaps scaled by 1 / rate. Images and question texts are new per
    rate and request, so no request hits the vision cache or another's whole prompt in the prefix cache.
    """
    if 2 * n * (load_index + 1) > ARRIVAL_RNG_INDEX:
        raise ValueError(f"{n} arrival requests per rate at {load_index + 1} rates need more than "
                         f"{ARRIVAL_RNG_INDEX} image seeds per repeat")
    rng = np.random.default_rng(seed(9, repeat, ARRIVAL_RNG_INDEX))
    gaps = rng.exponential(1.0, n - 1)
    kinds = rng.choice(len(ARRIVAL_KINDS), size=n, p=np.asarray(mix, dtype=float) / sum(mix))
    tokens = rng.choice(np.asarray(lengths), size=n)
    arrivals = np.concatenate([[0.0], np.cumsum(gaps)]) / rate
    return [ArrivalRequest(i, float(arrivals[i]),
                           tuple(image_png(seed(9, repeat, 2 * (n * load_index + i) + j), side)
                                 for j in range(int(kinds[i]))),
                           f"{QUESTIONS[i % len(QUESTIONS)]} (request {i + 1}, run {load_index + 1})",
                           int(tokens[i]))
            for i in range(n)]


def calibration_requests(lengths: tuple[int, ...], side: int) -> list[ArrivalRequest]:
    """One request of each kind with the longest of `lengths`, on images of their own (scenario 9's capacity)."""
    return [ArrivalRequest(k, 0.0, tuple(image_png(seed(9, CALIBRATION_REPEAT, 2 * k + j), side) for j in range(k)),
                           f"{QUESTIONS[k % len(QUESTIONS)]} (calibration)", max(lengths))
            for k in range(len(ARRIVAL_KINDS))]


def _pixels(seed_: int, width: int, height: int) -> np.ndarray:
    """A smooth random picture (an upsampled 8x8 colour field) with light noise: compresses well, unique per seed."""
    rng = np.random.default_rng(seed_)
    field = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                     Image.Resampling.BICUBIC)
    noise = rng.integers(-8, 9, (height, width, 3))
    return np.clip(np.asarray(field, dtype=np.int16) + noise, 0, 255).astype(np.uint8)


def image_png(seed_: int, side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_pixels(seed_, side, side)).save(buf, format="PNG")
    return buf.getvalue()


def tiles(data: bytes, max_num: int = 12) -> torch.Tensor:
    """What the original's `load_image` makes of an image: float32 [tiles, 3, 448, 448]."""
    return load_image(data, max_num=max_num)


def video_mp4(seed_: int, frames: int, side: int) -> bytes:
    """An MPEG-4 clip of `2 * frames` frames at 8 fps (so sampling `frames` segments picks distinct frames)."""
    rng = np.random.default_rng(seed_)
    base = _pixels(seed_, side, side).astype(np.int16)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=VIDEO_FPS)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 4_000_000
        for i in range(2 * frames):
            shift = np.roll(base, shift=(i * 7, i * 11), axis=(0, 1))
            tint = rng.integers(-40, 41, 3)
            frame = np.clip(shift + tint, 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def video_tiles(data: bytes, num_segments: int) -> torch.Tensor:
    """The original `load_video`: decode every frame, pick the segments' middle frames, one tile each."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    picks = frame_indices(len(decoded), fps, num_segments)
    return torch.cat([load_image(Image.fromarray(decoded[i]), max_num=1) for i in picks])
