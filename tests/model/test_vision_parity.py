"""The vision path (InternViT -> pixel shuffle v2 -> mlp1) against two independent implementations."""

import pytest
import torch
from reference_impl import internvit_forward, native_config, read_original, to_native_state_dict
from transformers import InternVLModel

from services.model.checkpoint import open_checkpoint
from services.model.modules import load_vision
from services.vision.preprocess import load_image

STYLES = ["300m", "6b"]


@pytest.fixture(scope="module")
def pixels(golden_dir):
    # Two golden images' tiles: real image statistics, and more than one tile per batch.
    return torch.cat([load_image(golden_dir / "small_120x90.png", max_num=2),
                      load_image(golden_dir / "portrait_333x1200.png", max_num=1)])


@pytest.mark.parametrize("vision", STYLES)
def test_vision_path_equals_reference_internvit(tiny_checkpoint, pixels, vision):
    directory = tiny_checkpoint(llm="qwen2", vision=vision)
    config, weights = read_original(directory)
    expected = internvit_forward(config, weights, pixels)
    ours = load_vision(open_checkpoint(directory), torch.float32, "cpu").encode(pixels)
    assert ours.shape == (pixels.shape[0], 256, config["llm_config"]["hidden_size"])
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    # The outputs are not degenerate: tiles differ from each other, so a tile-order bug cannot hide.
    assert (ours[0] - ours[1]).abs().max() > 1e-2


@pytest.mark.parametrize("vision", STYLES)
def test_vision_path_equals_transformers_native_internvl(tiny_checkpoint, pixels, vision):
    directory = tiny_checkpoint(llm="internlm2", vision=vision)
    config, weights = read_original(directory)
    native = InternVLModel(native_config(config)).eval()
    state = {k.removeprefix("model."): v for k, v in to_native_state_dict(config, weights).items()
             if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))}
    missing, unexpected = native.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("language_model.") for k in missing)
    with torch.inference_mode():
        expected = native.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
    ours = load_vision(open_checkpoint(directory), torch.float32, "cpu").encode(pixels)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_bf16_weights_upcast_exactly(tiny_checkpoint):
    directory = tiny_checkpoint()
    _, weights = read_original(directory)
    model = load_vision(open_checkpoint(directory), torch.float32, "cpu")
    loaded = model.vision_tower.embeddings.cls_token
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded, weights["vision_model.embeddings.class_embedding"])


def test_bf16_compute_stays_close_to_float32(tiny_checkpoint, pixels):
    checkpoint = open_checkpoint(tiny_checkpoint())
    full = load_vision(checkpoint, torch.float32, "cpu").encode(pixels[:1])
    half = load_vision(checkpoint, torch.bfloat16, "cpu").encode(pixels[:1])
    assert half.dtype == torch.bfloat16
    # bf16 has 8 bits of mantissa: a loose bound, but tight enough to catch a wrong weight or layout.
    assert (half.float() - full).abs().max() / full.abs().max() < 0.05
