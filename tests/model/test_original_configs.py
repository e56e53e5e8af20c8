"""The configuration classes of the original format (services.model.original_configs) read config.json as the original
code does: every key the file has, the original defaults for what it omits, RoPE as transformers 5 spells it."""

import json

import pytest
from transformers import Qwen2Config

from services.contract.errors import CheckpointError
from services.model.original_configs import (
    InternLM2Config,
    InternVisionConfig,
    InternVLChatConfig,
    llm_config_from_dict,
)
from services.model.tiny import PRESETS, chat_config


@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
@pytest.mark.parametrize("vision", ["300m", "6b"])
def test_every_key_of_a_config_json_is_read(llm, vision):
    raw = chat_config(PRESETS["small"], llm, vision)
    config = InternVLChatConfig(**json.loads(json.dumps(raw)))
    for key in ("select_layer", "downsample_ratio", "ps_version", "force_image_size", "dynamic_image_size",
                "use_thumbnail", "min_dynamic_patch", "max_dynamic_patch", "template"):
        assert getattr(config, key) == raw[key], key
    assert isinstance(config.vision_config, InternVisionConfig)
    for key, value in raw["vision_config"].items():
        if key not in ("architectures", "torch_dtype", "model_type"):
            assert getattr(config.vision_config, key) == value, key
    text = config.llm_config
    assert isinstance(text, Qwen2Config if llm == "qwen2" else InternLM2Config)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps"):
        assert getattr(text, key) == raw["llm_config"][key], key
    assert text.architectures == raw["llm_config"]["architectures"]
    assert text.tie_word_embeddings is False and config.tie_word_embeddings is False
    expected_rope = ({"rope_type": "default", "rope_theta": 1e6} if llm == "qwen2"
                     else {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 2.0})
    assert {k: text.rope_parameters[k] for k in expected_rope} == expected_rope


def test_omitted_keys_mean_the_original_defaults():
    config = InternVLChatConfig(vision_config={}, llm_config={"architectures": ["InternLM2ForCausalLM"]})
    # configuration_intern_vit.py: InternViT-6B's shape and style.
    vision = config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.norm_type, vision.qk_normalization,
            vision.qkv_bias, vision.image_size) == (3200, 48, "rms_norm", True, False, 224)
    # configuration_internvl_chat.py.
    assert (config.select_layer, config.downsample_ratio, config.ps_version, config.use_thumbnail,
            config.max_dynamic_patch) == (-1, 0.5, "v1", False, 6)
    # configuration_internlm2.py.
    text = config.llm_config
    assert (text.vocab_size, text.hidden_size, text.num_key_value_heads, text.max_position_embeddings,
            text.bias, text.rope_parameters) == (103168, 4096, 32, 2048, True,
                                                 {"rope_type": "default", "rope_theta": 10000.0})
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (1, 2, 0)


def test_to_dict_is_the_original_layout_and_reads_back():
    raw = chat_config(PRESETS["small"], "internlm2", "6b")
    config = InternVLChatConfig(**raw)
    out = config.to_dict()
    assert out["model_type"] == "internvl_chat" and "text_config" not in out
    assert out["vision_config"]["model_type"] == "intern_vit_6b"
    assert out["llm_config"]["model_type"] == "internlm2"
    again = InternVLChatConfig(**out)
    assert again.llm_config.rope_parameters == config.llm_config.rope_parameters
    assert again.vision_config.to_dict() == config.vision_config.to_dict()


def test_an_unknown_language_model_is_refused():
    with pytest.raises(CheckpointError, match="LlamaForCausalLM"):
        llm_config_from_dict({"architectures": ["LlamaForCausalLM"]})
