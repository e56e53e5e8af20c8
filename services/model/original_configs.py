"""transformers configuration classes for the original OpenGVLab checkpoint format, for libraries that read a
checkpoint through `AutoConfig` (vLLM does).

The published checkpoints ship these classes as code of their own (`configuration_internvl_chat.py`,
`configuration_intern_vit.py`, `configuration_internlm2.py`) and are read with `trust_remote_code`; the checkpoints
this project writes (`make-tiny`, converted copies) carry only `config.json`, and no checkpoint's code is ever run
for its configuration. These classes stand in for that code: the same `model_type`s, the same attribute names, the
original defaults (`services.model.spec`, so a key a config omits means what it meant to the original), and the
4.37-era RoPE keys translated to transformers 5's `rope_parameters` as `services.model.spec` does for our own
engine. Registering them with `AutoConfig` is the caller's business (`services.llm.engine.vllm.plugin`).

transformers has `qwen2` (the llm_config of the Qwen2 sizes) but no `internlm2`: that one is `InternLM2Config` here.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig, Qwen2Config

from services.contract.errors import CheckpointError
from services.model.spec import ORIGINAL_CHAT_DEFAULTS, ORIGINAL_VISION_DEFAULTS, rope_parameters

# The original InternLM2Config's defaults (configuration_internlm2.py of the InternLM2 sizes), for keys a config
# omits.
ORIGINAL_INTERNLM2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 103168,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "bias": True,
    "rope_theta": 10000.0,
    "rope_scaling": None,
}


class InternVisionConfig(PreTrainedConfig):
    """InternViT's `vision_config` (`model_type: intern_vit_6b`); defaults describe InternViT-6B, as the original's."""

    model_type = "intern_vit_6b"

    def __init__(self, use_flash_attn: bool = False, dropout: float = 0.0, drop_path_rate: float = 0.0,
                 attention_dropout: float = 0.0, initializer_range: float = 0.02, initializer_factor: float = 0.1,
                 **kwargs: Any):
        merged = {**ORIGINAL_VISION_DEFAULTS, **{k: kwargs.pop(k) for k in list(kwargs)
                                                  if k in ORIGINAL_VISION_DEFAULTS}}
        for name, value in merged.items():
            setattr(self, name, value)
        self.use_flash_attn = use_flash_attn
        self.dropout, self.drop_path_rate, self.attention_dropout = dropout, drop_path_rate, attention_dropout
        self.initializer_range, self.initializer_factor = initializer_range, initializer_factor
        super().__init__(**kwargs)


class InternLM2Config(PreTrainedConfig):
    """InternLM2's `llm_config` (`model_type: internlm2`): Llama-shaped with a fused `wqkv`; `rope_parameters` from
    `rope_theta` and `rope_scaling` (dynamic NTK in the published sizes)."""

    model_type = "internlm2"

    def __init__(self, pad_token_id: int | None = 0, bos_token_id: int | None = 1, eos_token_id: int | None = 2,
                 tie_word_embeddings: bool = False, use_cache: bool = True, **kwargs: Any):
        merged = {**ORIGINAL_INTERNLM2_DEFAULTS, **{k: kwargs.pop(k) for k in list(kwargs)
                                                     if k in ORIGINAL_INTERNLM2_DEFAULTS}}
        kwargs.pop("attn_implementation", None)  # the original code's choice of attention kernel, nothing here
        if merged["num_key_value_heads"] is None:
            merged["num_key_value_heads"] = merged["num_attention_heads"]
        for name, value in merged.items():
            setattr(self, name, value)
        self.rope_parameters = rope_parameters(merged)
        self.use_cache = use_cache
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)


def llm_config_from_dict(raw: dict[str, Any]) -> PreTrainedConfig:
    """The `llm_config` object of an original config: Qwen2Config or InternLM2Config, by its architecture."""
    raw = dict(raw)
    architectures = raw.get("architectures") or []
    architecture = architectures[0] if architectures else None
    raw.pop("model_type", None)
    if architecture == "Qwen2ForCausalLM":
        # InternVLChatConfig forces untied embeddings for every size; the checkpoints ship lm_head.weight.
        raw.update(rope_parameters=rope_parameters(raw), tie_word_embeddings=False)
        raw.pop("rope_theta", None)
        raw.pop("rope_scaling", None)
        return Qwen2Config(**raw)
    if architecture == "InternLM2ForCausalLM":
        return InternLM2Config(**raw)
    raise CheckpointError(f"llm_config: unsupported language model architecture {architecture!r}")


class InternVLChatConfig(PreTrainedConfig):
    """The top level (`model_type: internvl_chat`): `vision_config` (InternVisionConfig), `llm_config` (Qwen2Config
    or InternLM2Config) and the chat model's own keys with the original defaults."""

    model_type = "internvl_chat"

    def __init__(self, vision_config: dict | PreTrainedConfig | None = None,
                 llm_config: dict | PreTrainedConfig | None = None, use_backbone_lora: int = 0,
                 use_llm_lora: int = 0, **kwargs: Any):
        merged = {**ORIGINAL_CHAT_DEFAULTS, **{k: kwargs.pop(k) for k in list(kwargs)
                                                if k in ORIGINAL_CHAT_DEFAULTS}}
        for name, value in merged.items():
            setattr(self, name, value)
        if isinstance(vision_config, dict) or vision_config is None:
            vision_config = InternVisionConfig(**(vision_config or {}))
        if isinstance(llm_config, dict):
            llm_config = llm_config_from_dict(llm_config)
        elif llm_config is None:  # only transformers' own no-argument construction (to_diff_dict) comes here
            llm_config = Qwen2Config()
        self.vision_config, self.llm_config = vision_config, llm_config
        self.use_backbone_lora, self.use_llm_lora = use_backbone_lora, use_llm_lora
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        out["llm_config"] = self.llm_config.to_dict()
        out.pop("text_config", None)  # an alias a reader may add (vLLM does), not a key of the format
        return out


CONFIG_CLASSES: tuple[type[PreTrainedConfig], ...] = (InternVLChatConfig, InternVisionConfig, InternLM2Config)
