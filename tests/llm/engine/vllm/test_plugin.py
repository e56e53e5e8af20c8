"""The vLLM plugin in this process (vLLM runs the same `register()` in each process it starts): our checkpoints read
through AutoConfig without their code, the checkpoint's tokenizer under vLLM's tokenizer mode, vLLM's InternVL pixel
transform without torchvision (equal to our preprocessing bit for bit), image rows of different lengths accepted, the
language models with LoRA on their head registered and our xgrammar backend installed.
"""

from __future__ import annotations

import importlib.metadata
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig

from services.llm.engine.vllm import plugin
from services.model.checkpoint import open_checkpoint
from services.model.modules import load_tokenizer
from services.model.original_configs import InternLM2Config, InternVLChatConfig
from services.model.tiny import make_tiny
from services.vision.preprocess import tiles_to_tensor


@pytest.fixture(scope="module", autouse=True)
def registered():
    plugin.register()
    plugin.register()  # vLLM may load plugins more than once in a process: harmless


def test_the_entry_point_names_register():
    entries = {e.name: e.value for e in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert entries["internvl_serve"] == "services.llm.engine.vllm.plugin:register"


@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_autoconfig_reads_our_checkpoints_without_their_code(tmp_path, llm):
    directory = make_tiny(tmp_path / llm, llm=llm, preset="small")
    # The published checkpoints' configuration module: must never be imported.
    (directory / "configuration_internvl_chat.py").write_text("raise RuntimeError('remote code ran')\n")
    config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    assert isinstance(config, InternVLChatConfig)
    assert config.architectures == ["InternVLChatModel"]
    assert config.llm_config.architectures == [{"qwen2": "Qwen2ForCausalLM", "internlm2": "InternLM2ForCausalLM"}[llm]]
    assert isinstance(config.llm_config, InternLM2Config) == (llm == "internlm2")
    assert config.llm_config.hidden_size // config.llm_config.num_attention_heads == 32


def test_the_tokenizer_mode_loads_the_checkpoints_tokenizer(tiny_checkpoint):
    from vllm.tokenizers.registry import get_tokenizer

    directory = tiny_checkpoint()
    ours = load_tokenizer(open_checkpoint(directory))
    theirs = get_tokenizer(str(directory), tokenizer_mode=plugin.TOKENIZER_MODE)
    text = "<|im_start|>user\n<img><IMG_CONTEXT></img>\nHello, 世界<|im_end|>"
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text, add_special_tokens=False)
    assert theirs.convert_tokens_to_ids("<IMG_CONTEXT>") == 151667


def test_vllms_pixel_transform_runs_without_torchvision_and_equals_our_preprocessing():
    from vllm.transformers_utils.processors.internvl import build_transform

    assert "torchvision" not in sys.modules and "torchvision.transforms" not in sys.modules
    pixels = np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    theirs = build_transform(448)(image)
    assert theirs.shape == (3, 448, 448)
    assert torch.equal(theirs, tiles_to_tensor([image])[0])
    # A grey image goes through convert_image_mode first.
    grey = image.convert("L")
    assert torch.equal(build_transform(448)(grey), tiles_to_tensor([grey.convert("RGB")])[0])


def test_images_with_different_row_counts_pass_the_input_schema():
    from vllm.model_executor.models.internvl import InternVLImageEmbeddingInputs

    one_tile, three_tiles = torch.zeros(256, 128), torch.zeros(768, 128)
    inputs = InternVLImageEmbeddingInputs(type="image_embeds", data=[one_tile, three_tiles])
    assert [t.shape[0] for t in inputs.data] == [256, 768]
    with pytest.raises(ValueError, match="data"):  # the hidden size still has to agree
        InternVLImageEmbeddingInputs(type="image_embeds", data=[one_tile, torch.zeros(768, 64)])


def test_the_language_models_take_lora_on_their_head_and_the_grammar_backend_is_ours():
    import vllm.v1.structured_output
    from vllm import ModelRegistry

    from services.llm.engine.vllm.grammar_backend import CheckpointXgrammarBackend
    from services.llm.engine.vllm.lora_heads import InternLM2WithLoRAHead, Qwen2WithLoRAHead

    for architecture, model_class in [("Qwen2ForCausalLM", Qwen2WithLoRAHead),
                                      ("InternLM2ForCausalLM", InternLM2WithLoRAHead)]:
        assert ModelRegistry.models[architecture].load_model_cls() is model_class
        assert model_class.embedding_modules == {"lm_head": "output_embeddings"}
    assert vllm.v1.structured_output.XgrammarBackend is CheckpointXgrammarBackend
