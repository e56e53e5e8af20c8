"""The soak's media, made on the fly: small noise PNGs (one per seed, so a seed is a cache key); its clips are the
benchmark's (bench.workload.video_mp4). Small enough that thousands of requests stay cheap on the tiny checkpoint."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def noise_png(seed: int, width: int = 64, height: int = 48) -> bytes:
    """A PNG of random pixels; every seed gives another image, so another embedding-cache key."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()



def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# Not an image: the gateway must refuse it as INVALID_ARGUMENT (HTTP 400) before any model work.
NOT_AN_IMAGE = b"\x89PNG\r\n\x1a\n" + b"this is not a PNG body" * 4
