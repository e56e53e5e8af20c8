"""Media the reliability tests make on the fly: good images and videos, and every kind of bad one."""

from __future__ import annotations

import io
import struct
import zlib

import av
import numpy as np
from PIL import Image


def noise_png(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    """A PNG of random pixels: every seed a different image, so a different cache key."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def solid_png(width: int, height: int, seed: int = 0) -> bytes:
    """A PNG of one colour: large dimensions (so many tiles) in a few kilobytes."""
    rng = np.random.default_rng(seed)
    return encoded(Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(0, 256, 3))), "PNG")


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header announcing width x height pixels (10 gigapixels by default) in a few dozen bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + _chunk(b"IEND", b""))


def corrupt_png(seed: int = 0) -> bytes:
    """A PNG whose header is intact and whose compressed pixel data is garbage."""
    good = noise_png(64, 48, seed)
    start = good.index(b"IDAT") + 4
    garbage = bytes(np.random.default_rng(seed + 1).integers(0, 256, 200, dtype=np.uint8))
    return good[:start] + garbage + good[start + len(garbage):]


def write_video(frames: int = 12, fps: int = 6, size=(64, 48), fmt: str = "mp4", seed: int = 0) -> bytes:
    width, height = size
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def video_without_frames() -> bytes:
    """An AVI container with a video stream and not one frame in it."""
    buf = io.BytesIO()
    container = av.open(buf, mode="w", format="avi")
    stream = container.add_stream("mpeg4", rate=8)
    stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
    container.start_encoding()  # writes the header although no frame follows
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return buf.getvalue()


def audio_only(fmt: str = "matroska") -> bytes:
    """A container holding a second of silence and no video stream."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
