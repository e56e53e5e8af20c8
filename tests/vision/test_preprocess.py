"""InternVL 2.5 image preprocessing against the shared golden files, plus bad-input handling."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from golden import GOLDEN
from helpers.media import encoded, noise_png
from PIL import Image
from torch_kernels import Kernels

from services.contract.errors import InvalidMediaError, MediaTooLargeError
from services.contract.tiling import count_tiles, tile_grid
from services.vision.preprocess import dynamic_tiles, load_image, open_image, tiles_to_tensor

TOL = 1e-4


def _assert_close(actual: torch.Tensor, expected, atol: float = TOL) -> None:
    # Plain max-abs-diff: torch.testing.assert_close costs ~1 s of imports on first use.
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape
    worst = (actual - expected).abs().max().item()
    assert worst <= atol, f"max abs diff {worst:.3g} > {atol}\nactual={actual}\nexpected={expected}"


def _golden(name: str) -> dict:
    return json.loads((GOLDEN / name).read_text())


TILING = _golden("tiling_public.json")["cases"]
PIXELS = _golden("pixels_public.json")["images"]


# --- tiling -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case", TILING, ids=[f"{c['width']}x{c['height']}-max{c['max_num']}" for c in TILING]
)
def test_tiling_matches_golden(case):
    w, h, size = case["width"], case["height"], case["image_size"]
    assert tile_grid(w, h, case["min_num"], case["max_num"], size) == (case["grid_cols"], case["grid_rows"])
    assert count_tiles(w, h, case["max_num"], size, use_thumbnail=False) == case["tiles"]
    assert count_tiles(w, h, case["max_num"], size, use_thumbnail=True) == case["tiles_with_thumbnail"]


@pytest.mark.parametrize(
    ("width", "height", "grid", "tiles"),
    [
        (800, 600, (4, 3), 13),
        (1280, 720, (4, 2), 9),
        (448, 448, (1, 1), 1),
        # Square images tie on aspect ratio; the area tie-break decides how far up the grid goes.
        (634, 634, (2, 2), 5),
        (1000, 1000, (3, 3), 10),
    ],
    ids=["800x600", "1280x720", "448x448", "634x634-tiebreak", "1000x1000-tiebreak"],
)
def test_reference_examples(width, height, grid, tiles):
    assert tile_grid(width, height) == grid
    assert count_tiles(width, height) == tiles


@pytest.mark.parametrize(
    "kwargs",
    [
        {"width": 0, "height": 10},
        {"width": 10, "height": -1},
        {"width": 10, "height": 10, "min_num": 0},
        {"width": 10, "height": 10, "min_num": 5, "max_num": 4},
        {"width": 10, "height": 10, "image_size": 0},
    ],
    ids=["zero-width", "negative-height", "min_num-0", "max_lt_min", "image_size-0"],
)
def test_tile_grid_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        tile_grid(**kwargs)


def test_dynamic_tiles_are_row_major_with_thumbnail_last():
    # Four flat quadrants on a 2x2 grid: each tile must be exactly one colour, in row-major order.
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    image = Image.new("RGB", (896, 896))
    for k, colour in enumerate(colours):
        x, y = (k % 2) * 448, (k // 2) * 448
        image.paste(colour, (x, y, x + 448, y + 448))

    tiles = dynamic_tiles(image, max_num=4)
    assert len(tiles) == 5 and all(t.size == (448, 448) for t in tiles)
    for tile, colour in zip(tiles, colours):
        assert tile.getextrema() == tuple((c, c) for c in colour)
    assert np.array_equal(np.asarray(tiles[-1]), np.asarray(image.resize((448, 448))))

    assert len(dynamic_tiles(image, max_num=4, use_thumbnail=False)) == 4
    assert len(dynamic_tiles(image, max_num=1)) == 1  # a single tile never gets a thumbnail


@pytest.mark.parametrize(("width", "height"), [(1, 20000), (20000, 1), (3, 19999), (7919, 2), (1, 1)])
@pytest.mark.parametrize("max_num", [1, 12, 40])
def test_extreme_aspect_ratios_stay_within_max_num_tiles(width, height, max_num):
    """A strip of 1x20000 pixels gets at most `max_num` grid tiles (+1 thumbnail), never a grid that follows its
    ratio: the resized image the tiles are cut from has at most max_num * 448**2 pixels (the blow-up of the
    original's dynamic_preprocess in OpenGVLab/InternVL PR 1256)."""
    cols, rows = tile_grid(width, height, 1, max_num)
    assert cols * rows <= max_num
    # The grid follows the strip's orientation as far as max_num allows.
    assert (cols, rows) == ((max_num, 1) if width > 2 * height else (1, max_num) if height > 2 * width else (cols, rows))
    resized: list[tuple[int, int]] = []
    original = Image.Image.resize

    def recording(self, size, *args, **kwargs):
        resized.append(tuple(size))
        return original(self, size, *args, **kwargs)

    image = Image.new("RGB", (width, height), (200, 10, 10))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Image.Image, "resize", recording)
        tiles = dynamic_tiles(image, max_num=max_num)
    assert len(tiles) == count_tiles(width, height, max_num) <= max_num + 1
    assert all(w * h <= max_num * 448 * 448 for w, h in resized), resized


def test_tiles_to_tensor_converts_mode_and_resizes():
    out = tiles_to_tensor([Image.new("L", (100, 50), 255)])
    assert out.shape == (1, 3, 448, 448) and out.dtype == torch.float32
    expected = (1.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    _assert_close(out[0, :, 0, 0], expected, atol=1e-6)


def _reference_tiles_to_tensor(tiles) -> torch.Tensor:
    """``ToTensor`` + ``Normalize`` as the model card runs them: torch float32 arithmetic on the whole stack."""
    arrays = [np.asarray(t.convert("RGB").resize((448, 448), Image.Resampling.BICUBIC) if t.size != (448, 448)
                         else t.convert("RGB"), dtype=np.uint8) for t in tiles]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(torch.float32).div(255)
    mean = torch.tensor((0.485, 0.456, 0.406), dtype=torch.float32)[:, None, None]
    std = torch.tensor((0.229, 0.224, 0.225), dtype=torch.float32)[:, None, None]
    return pixels.sub_(mean).div_(std)


def test_tiles_to_tensor_is_the_reference_arithmetic_bit_for_bit():
    # Every uint8 value in every channel (rows 0..255 of the first tile), noise, a grey and a small tile.
    every = np.zeros((448, 448, 3), dtype=np.uint8)
    every[:256] = np.arange(256, dtype=np.uint8)[:, None, None]
    every[:256, 200:] = (255 - np.arange(256, dtype=np.uint8))[:, None, None]
    noise = np.random.default_rng(7).integers(0, 256, (448, 448, 3), dtype=np.uint8)
    tiles = [Image.fromarray(every), Image.fromarray(noise), Image.fromarray(noise).convert("L"),
             Image.fromarray(noise[:120, :300])]
    out = tiles_to_tensor(tiles)
    assert out.dtype == torch.float32 and out.is_contiguous() and out.shape == (4, 3, 448, 448)
    assert torch.equal(out, _reference_tiles_to_tensor(tiles))


def test_tiles_to_tensor_runs_no_torch_kernel():
    # It runs in the service's preprocessing threads: a torch kernel there would give each of them an OpenMP team,
    # which makes libgomp throttle the spin-waiting of the encoder thread's team (slower forwards).
    tiles = [Image.new("RGB", (448, 448), (1, 2, 3)), Image.new("L", (100, 50), 255)]
    with Kernels() as kernels:
        tiles_to_tensor(tiles)
    assert kernels.ops == []


# --- pixels ---------------------------------------------------------------------------------------


@functools.cache
def _pixels(file: str, max_num: int) -> torch.Tensor:
    return load_image(GOLDEN / file, max_num=max_num)


@pytest.mark.parametrize("image", PIXELS, ids=[Path(i["file"]).stem for i in PIXELS])
def test_pixels_shape_and_tile_stats_match_golden(image):
    pixels = _pixels(image["file"], image["max_num"])
    assert list(pixels.shape) == image["shape"]
    assert pixels.dtype == torch.float32
    with Image.open(GOLDEN / image["file"]) as im:
        assert pixels.shape[0] == count_tiles(*im.size, max_num=image["max_num"])

    mean = pixels.mean(dim=(2, 3))
    # The golden stds are population stds (divide by N, unbiased=False): on the first image they
    # match to ~1e-7, while the sample std (N-1) is off by ~3e-6. Both are inside 1e-4 at N=448*448,
    # but we compare like with like.
    std = pixels.std(dim=(2, 3), unbiased=False)
    _assert_close(mean, image["tile_channel_mean"])
    _assert_close(std, image["tile_channel_std"])


PIXEL_SAMPLES = [(i["file"], i["max_num"], s) for i in PIXELS for s in i["samples"]]


@pytest.mark.parametrize(
    ("file", "max_num", "sample"),
    PIXEL_SAMPLES,
    ids=[f"{Path(f).stem}-t{s['tile']}c{s['c']}y{s['y']}x{s['x']}" for f, _, s in PIXEL_SAMPLES],
)
def test_pixel_samples_match_golden(file, max_num, sample):
    value = _pixels(file, max_num)[sample["tile"], sample["c"], sample["y"], sample["x"]].item()
    assert value == pytest.approx(sample["value"], abs=TOL)


# --- decoding and bad input ------------------------------------------------------------------------


def test_open_image_accepts_path_bytes_and_pil():
    path = GOLDEN / "small_120x90.png"
    reference = np.asarray(open_image(path))
    assert reference.shape == (90, 120, 3)
    assert np.array_equal(np.asarray(open_image(str(path))), reference)
    assert np.array_equal(np.asarray(open_image(path.read_bytes())), reference)
    grey = open_image(Image.new("L", (3, 2), 7))
    assert grey.mode == "RGB" and grey.size == (3, 2)


@pytest.mark.parametrize(
    ("data", "max_pixels", "message"),
    [
        (b"", None, "empty"),
        (b"this is not an image, just some text", None, r"cannot decode image: not a supported image format \(send PNG, JPEG"),
        (noise_png(64, 64)[:400], None, "cannot decode"),  # header intact, pixel data cut short
        # 5000x5000 1-bit PNG: a few KB on the wire, 75 MB once decoded to RGB.
        (encoded(Image.new("1", (5000, 5000))), 1_000_000, "5000x5000"),
    ],
    ids=["empty-bytes", "not-an-image", "truncated-png", "decompression-bomb"],
)
def test_open_image_rejects_bad_media(data, max_pixels, message):
    with pytest.raises(InvalidMediaError, match=message):
        open_image(data, max_pixels=max_pixels)


def test_load_image_enforces_pixel_limit():
    with pytest.raises(MediaTooLargeError, match="above the limit"):
        load_image(GOLDEN / "small_120x90.png", max_pixels=120 * 90 - 1)


def test_invalid_media_error_is_a_value_error():
    assert issubclass(InvalidMediaError, ValueError)
