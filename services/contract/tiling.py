"""The dynamic tiling rule of InternVL 2.5, on paper: which tile grid an image gets and how many tiles that is.

An image becomes a grid of ``cols x rows`` tiles of ``image_size`` pixels, chosen so the grid's shape follows the
image's aspect ratio, plus one downscaled thumbnail of the whole image when the grid has more than one tile. Each
tile costs the language model 256 tokens, so ``count_tiles`` is also how the gateway budgets context and keys an
image before any pixels are decoded; the vision service cuts the pixels by the same ``tile_grid``.
"""

from __future__ import annotations

import functools

IMAGE_SIZE = 448
# The original `load_image` default; a request may ask for fewer or more tiles, up to MAX_NUM_LIMIT.
DEFAULT_MAX_NUM = 12
# The most tiles a request may ask an image to be cut into. InternVL 2.5's evaluation scripts go up to 24 for
# documents; 40 leaves headroom while bounding one image's work (41 forwards).
MAX_NUM_LIMIT = 40

# 64 megapixels is an 8000x8000 photo, well beyond any camera a user sends, while a decoded RGB
# image of that size still fits in memory (192 MB). Pillow's own guard only fires at ~179 MP.
DEFAULT_MAX_PIXELS = 64_000_000


@functools.lru_cache(maxsize=64)
def _candidate_grids(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    """Every (cols, rows) with ``min_num <= cols*rows <= max_num``, ordered by area.

    Built as the original (the same set, filled in the same order, then a stable sort by area) so that grids of equal area keep
    the original's relative order, which decides the winner when two of them tie on aspect ratio. Kept per
    (min_num, max_num): building it loops max_num**3 times (6 ms at 40), for every image the gateway plans.
    """
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return tuple(sorted(grids, key=lambda x: x[0] * x[1]))


def tile_grid(
    width: int, height: int, min_num: int = 1, max_num: int = 12, image_size: int = IMAGE_SIZE
) -> tuple[int, int]:
    """The (cols, rows) tile grid InternVL 2.5 picks for a ``width x height`` image.

    Always ``cols * rows <= max_num`` whatever the aspect ratio, so the grid the image is resized to before cutting
    holds at most ``max_num * image_size**2`` pixels (8 MP at the request limit of 40): a 1x20000 strip gets 1x40
    tiles, resized to 448x17920, not a grid that follows its 20000:1 ratio (the original's ``dynamic_preprocess``
    with a large ``max_num`` is the blow-up of OpenGVLab/InternVL PR 1256; here ``max_num`` is capped by
    ``MAX_NUM_LIMIT`` before any pixel is read).

    The grid whose cols/rows ratio is closest to width/height wins. On an exact tie (a square image
    ties 1x1, 2x2 and 3x3; a 3:2 image ties 1x1 and 2x1) the later, larger grid wins only when the
    image has more pixels than half that grid's area: a small image is not blown up into many tiles
    of upscaled blur, while a large one keeps its detail. So 634x634 gives 2x2 and 1000x1000 gives 3x3.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if min_num < 1 or max_num < min_num:
        raise ValueError(f"need 1 <= min_num <= max_num, got min_num={min_num}, max_num={max_num}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")

    aspect_ratio = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in _candidate_grids(min_num, max_num):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def count_tiles(
    width: int, height: int, max_num: int = 12, image_size: int = IMAGE_SIZE, use_thumbnail: bool = True
) -> int:
    """How many tiles ``dynamic_tiles`` makes for a ``width x height`` image, without decoding it."""
    cols, rows = tile_grid(width, height, 1, max_num, image_size)
    n = cols * rows
    return n + 1 if use_thumbnail and n > 1 else n
