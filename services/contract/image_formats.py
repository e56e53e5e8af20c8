"""Which image files the stack accepts from callers, and how their header is read without trusting them."""

from __future__ import annotations

import io

from PIL import Image

# The image formats accepted from callers (Pillow names; JPEG includes the MPO JPEGs of many phones). Pillow can
# parse dozens more, some rarely exercised (EPS even runs Ghostscript): untrusted bytes only reach these parsers.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM")
UNSUPPORTED_FORMAT = "not a supported image format (send PNG, JPEG, WebP, GIF, BMP, TIFF or PPM)"


def open_untrusted(data: bytes) -> Image.Image:
    """``Image.open`` restricted to ``IMAGE_FORMATS`` (reads the header only)."""
    Image.init()  # registers every plugin (once), so that the allow-list may name any of them
    return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
