"""InternVL 2.5 image preprocessing: decode, dynamic tiling and normalisation.

A bit-for-bit port of ``dynamic_preprocess`` / ``build_transform`` / ``load_image`` from the InternVL
2.5 model card, using Pillow and torch only (torchvision's ``Resize`` on a PIL image is PIL's own
``resize``, and ``ToTensor`` + ``Normalize`` are two float32 operations we do directly).

The grid an image is cut into is ``services.contract.tiling.tile_grid``, the rule the gateway also
uses to count tiles and key images without decoding them; this module does the pixel work.
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from services.contract.errors import InvalidMediaError, MediaTooLargeError
from services.contract.image_formats import UNSUPPORTED_FORMAT, open_untrusted
from services.contract.tiling import DEFAULT_MAX_PIXELS, IMAGE_SIZE, tile_grid

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageSource = str | PathLike[str] | bytes | bytearray | memoryview | Image.Image


def dynamic_tiles(
    image: Image.Image,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = IMAGE_SIZE,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """Split ``image`` into ``cols*rows`` tiles of ``image_size x image_size`` (+1 thumbnail).

    Tiles come in row-major order (tile k is column k % cols, row k // cols); the thumbnail, the whole
    image squashed to one tile, is last and only present when there is more than one tile.
    """
    cols, rows = tile_grid(image.width, image.height, min_num, max_num, image_size)
    # No filter argument: the original relies on Pillow's default, BICUBIC.
    resized = image.resize((image_size * cols, image_size * rows))
    tiles = []
    for k in range(cols * rows):
        x, y = (k % cols) * image_size, (k // cols) * image_size
        tiles.append(resized.crop((x, y, x + image_size, y + image_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def _normalise_table() -> np.ndarray:
    """float32 [3, 256]: what ``ToTensor`` + ``Normalize`` make of each uint8 value in each channel.

    Computed once with the very torch operations the reference applies per pixel (uint8 -> float32, /255, minus
    mean, divided by std, each one correctly rounded float32 arithmetic, element by element), so looking a pixel
    up in it gives the same bits as running those operations on it.
    """
    values = torch.arange(256, dtype=torch.uint8).to(torch.float32).div(255).expand(3, 256).clone()
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None]
    return values.sub_(mean).div_(std).numpy()


_NORMALISE = _normalise_table()


def tiles_to_tensor(tiles: Sequence[Image.Image], image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """Stack tiles into a float32 tensor [n, 3, image_size, image_size], ImageNet-normalised.

    Same values as torchvision's ``ToTensor`` then ``Normalize`` (uint8 -> float32, /255, minus mean, divided by
    std, all in float32) bit for bit: each pixel is looked up in a table of those results (``_NORMALISE``).
    numpy only, no torch kernel: this runs in the service's preprocessing threads, and a torch kernel there would
    give each of those threads an OpenMP team of its own, which makes libgomp throttle the spin-waiting of the
    encoder thread's team (its workers then sleep and wake in the kernel around every parallel region of the
    forward).
    """
    if not tiles:
        raise ValueError("no tiles to convert")
    out = np.empty((len(tiles), 3, image_size, image_size), dtype=np.float32)
    for i, tile in enumerate(tiles):
        if tile.mode != "RGB":
            tile = tile.convert("RGB")
        if tile.size != (image_size, image_size):
            # torchvision's Resize((s, s), BICUBIC) on a PIL image is this call.
            tile = tile.resize((image_size, image_size), Image.Resampling.BICUBIC)
        pixels = np.asarray(tile, dtype=np.uint8)  # [S, S, 3]
        for c in range(3):
            np.take(_NORMALISE[c], pixels[:, :, c], out=out[i, c], mode="clip")
    return torch.from_numpy(out)


def _too_many_pixels(max_pixels: int | None) -> str:
    return f"image is too large: more pixels than the limit of {max_pixels or Image.MAX_IMAGE_PIXELS}"


def open_image(source: ImageSource, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``source`` (a path, encoded bytes or a PIL image) into a fully loaded RGB image.

    Raises ``InvalidMediaError`` for empty, undecodable or truncated data, and for images with more
    than ``max_pixels`` pixels (``None`` disables that limit). The size is checked from the header,
    before the pixels are decoded, so a small file that claims a huge image costs nothing.
    A path that cannot be read raises the usual ``OSError``: that is the caller's file, not bad media.
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (str, PathLike)):
            data = Path(source).read_bytes()
        elif isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
        else:
            raise TypeError(f"expected a path, bytes or PIL image, got {type(source).__name__}")
        if not data:
            raise InvalidMediaError("image data is empty")
        try:
            image = open_untrusted(data)
        except Image.DecompressionBombError as exc:
            raise MediaTooLargeError(_too_many_pixels(max_pixels)) from exc
        except Image.UnidentifiedImageError as exc:
            # Pillow's own message names an in-memory stream object; say what matters to the caller instead.
            raise InvalidMediaError(f"cannot decode image: {UNSUPPORTED_FORMAT}") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise InvalidMediaError(f"cannot decode image: {exc}") from exc
        except Exception as exc:  # a parser tripping over hostile bytes (struct.error, ...) is bad media
            raise InvalidMediaError("cannot decode image: corrupt data") from exc

    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidMediaError(f"image has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise MediaTooLargeError(
            f"image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}"
        )
    try:
        # convert() forces the full decode, so truncated data fails here rather than later.
        return image.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise MediaTooLargeError(_too_many_pixels(max_pixels)) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidMediaError(f"cannot decode image (truncated or corrupt data): {exc}") from exc
    except Exception as exc:  # as above
        raise InvalidMediaError("cannot decode image (truncated or corrupt data)") from exc


def load_image(
    source: ImageSource,
    max_num: int = 12,
    image_size: int = IMAGE_SIZE,
    use_thumbnail: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> torch.Tensor:
    """Decode, tile and normalise one image: float32 [tiles, 3, image_size, image_size].

    ``tiles == count_tiles(width, height, max_num, image_size, use_thumbnail)``.
    """
    image = open_image(source, max_pixels=max_pixels)
    tiles = dynamic_tiles(image, max_num=max_num, image_size=image_size, use_thumbnail=use_thumbnail)
    return tiles_to_tensor(tiles, image_size)
