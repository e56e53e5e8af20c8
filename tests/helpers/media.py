"""Media the tests make on the fly: images and videos, and every kind of bad one; a video's frames as the original
`load_video` tiles them."""

from __future__ import annotations

import io
import struct
import zlib

import av
import numpy as np
import torch
from PIL import Image

from gateway.video import frame_indices
from services.vision.preprocess import load_image


def png(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A PNG of one colour."""
    return encoded(Image.new("RGB", (width, height), color))


def gradient(width: int, height: int) -> Image.Image:
    """An image with detail everywhere, so any mix-up of tiles changes the embeddings."""
    x = np.broadcast_to(np.arange(width, dtype=np.float32)[None, :], (height, width))
    y = np.broadcast_to(np.arange(height, dtype=np.float32)[:, None], (height, width))
    rgb = np.stack([x * 255 / width, y * 255 / height, ((x + y) % 64) * 4], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def noise_png(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    """A PNG of random pixels: every seed a different image, so a different cache key."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def solid_png(width: int, height: int, seed: int = 0) -> bytes:
    """A PNG of one colour: large dimensions (so many tiles) in a few kilobytes."""
    rng = np.random.default_rng(seed)
    return png(width, height, tuple(int(c) for c in rng.integers(0, 256, 3)))


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
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
    """A clip of `frames` frames of random pixels (every seed other ones), MPEG-4 in `fmt`'s container."""
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


def decode_frames(data: bytes) -> tuple[list[np.ndarray], float]:
    """Every frame of a video decoded as RGB [height, width, 3] uint8, and its average frame rate: what the original
    `load_video` samples from."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)], float(stream.average_rate)


def reference_frames(data: bytes, num_segments: int) -> list[torch.Tensor]:
    """The original `load_video`: every frame decoded, `get_index` picks, one tile per frame (max_num=1)."""
    decoded, fps = decode_frames(data)
    picks = frame_indices(len(decoded), fps, num_segments)
    return [load_image(Image.fromarray(decoded[i]).convert("RGB"), max_num=1) for i in picks]


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
