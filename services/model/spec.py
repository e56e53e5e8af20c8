"""Typed view of an original OpenGVLab `internvl_chat` config.json, and its translation into transformers' configs.

The published checkpoints were written by transformers 4.37 and by the original remote code, whose defaults differ
from transformers' own InternVL classes. Everything that reads config.json goes through `ModelSpec.from_config`, so
the original defaults (not transformers') are applied in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import InternVLConfig, InternVLVisionConfig, LlamaConfig, Qwen2Config

from services.contract.errors import CheckpointError

# Defaults of the original `InternVisionConfig` (configuration_intern_vit.py). They describe InternViT-6B; a config
# that omits a key means this value, never transformers' InternVLVisionConfig default (layer_norm, 1024 wide).
ORIGINAL_VISION_DEFAULTS: dict[str, Any] = {
    "num_channels": 3,
    "patch_size": 14,
    "image_size": 224,
    "qkv_bias": False,
    "hidden_size": 3200,
    "num_attention_heads": 25,
    "intermediate_size": 12800,
    "qk_normalization": True,
    "num_hidden_layers": 48,
    "hidden_act": "gelu",
    "norm_type": "rms_norm",
    "layer_norm_eps": 1e-6,
}

# The original `InternVLChatConfig` defaults for the top-level keys we use.
ORIGINAL_CHAT_DEFAULTS: dict[str, Any] = {
    "template": None,
    "select_layer": -1,
    "downsample_ratio": 0.5,
    "ps_version": "v1",
    "force_image_size": None,
    "dynamic_image_size": False,
    "use_thumbnail": False,
    "min_dynamic_patch": 1,
    "max_dynamic_patch": 6,
}

SUPPORTED_LLMS = ("Qwen2ForCausalLM", "InternLM2ForCausalLM")
SUPPORTED_TEMPLATES = ("internvl2_5",)


@dataclass(frozen=True)
class VisionSpec:
    """InternViT tower hyper-parameters, original defaults applied."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    qkv_bias: bool
    qk_normalization: bool
    norm_type: str
    layer_norm_eps: float
    hidden_act: str

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VisionSpec:
        merged = {**ORIGINAL_VISION_DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
        if merged["norm_type"] not in ("layer_norm", "rms_norm"):
            raise CheckpointError(f"vision_config.norm_type {merged['norm_type']!r} is not layer_norm or rms_norm")
        return cls(**{name: merged[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ModelSpec:
    """Everything the services need to know about a checkpoint, read once from config.json."""

    vision: VisionSpec
    llm_architecture: str
    llm_config: dict[str, Any] = field(repr=False)
    template: str
    select_layer: int
    downsample_ratio: float
    ps_version: str
    image_size: int
    use_thumbnail: bool
    min_dynamic_patch: int
    max_dynamic_patch: int
    system_message: str | None

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "config.json") -> ModelSpec:
        if config.get("model_type") != "internvl_chat":
            raise CheckpointError(
                f"{source}: model_type is {config.get('model_type')!r}, expected 'internvl_chat' "
                "(the original OpenGVLab InternVL format)"
            )
        for key in ("vision_config", "llm_config"):
            if not isinstance(config.get(key), dict):
                raise CheckpointError(f"{source}: missing or malformed {key!r}")
        llm_config = config["llm_config"]
        architectures = llm_config.get("architectures") or []
        llm_architecture = architectures[0] if architectures else None
        if llm_architecture not in SUPPORTED_LLMS:
            raise CheckpointError(
                f"{source}: unsupported language model architecture {llm_architecture!r}; "
                f"supported: {', '.join(SUPPORTED_LLMS)}"
            )
        top = {**ORIGINAL_CHAT_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
        if top["template"] not in SUPPORTED_TEMPLATES:
            raise CheckpointError(f"{source}: unsupported template {top['template']!r}; supported: internvl2_5")
        if top["ps_version"] != "v2":
            raise CheckpointError(f"{source}: ps_version {top['ps_version']!r} is not supported (InternVL 2.5 uses v2)")
        vision = VisionSpec.from_dict(config["vision_config"])
        image_size = top["force_image_size"] or vision.image_size
        return cls(
            vision=vision,
            llm_architecture=llm_architecture,
            llm_config=llm_config,
            template=top["template"],
            select_layer=int(top["select_layer"]),
            downsample_ratio=float(top["downsample_ratio"]),
            ps_version=top["ps_version"],
            image_size=int(image_size),
            use_thumbnail=bool(top["use_thumbnail"]),
            min_dynamic_patch=int(top["min_dynamic_patch"]),
            max_dynamic_patch=int(top["max_dynamic_patch"]),
            # A null system_message in config.json means "absent": the original would render the string "None".
            system_message=config.get("system_message"),
        )

    @property
    def llm_hidden_size(self) -> int:
        return int(self.llm_config["hidden_size"])

    @property
    def tokens_per_tile(self) -> int:
        """256 for every InternVL 2.5 size: (448 / 14)^2 patches, pixel-shuffled by 0.5 in each direction."""
        return int((self.image_size // self.vision.patch_size) ** 2 * self.downsample_ratio**2)

    # -- transformers configs -------------------------------------------------------------------------------------

    def vision_hf_config(self) -> InternVLVisionConfig:
        v = self.vision
        return InternVLVisionConfig(
            hidden_size=v.hidden_size,
            num_hidden_layers=v.num_hidden_layers,
            num_attention_heads=v.num_attention_heads,
            intermediate_size=v.intermediate_size,
            attention_bias=v.qkv_bias,
            use_qk_norm=v.qk_normalization,
            norm_type=v.norm_type,
            layer_norm_eps=v.layer_norm_eps,
            hidden_act=v.hidden_act,
            image_size=[self.image_size, self.image_size],
            patch_size=[v.patch_size, v.patch_size],
            # InternViT has no final norm; transformers adds a LayerNorm unless mean pooling is "on".
            use_mean_pooling=True,
        )

    def text_hf_config(self) -> Qwen2Config | LlamaConfig:
        c = self.llm_config
        common = {
            "vocab_size": c["vocab_size"],
            "hidden_size": c["hidden_size"],
            "intermediate_size": c["intermediate_size"],
            "num_hidden_layers": c["num_hidden_layers"],
            "num_attention_heads": c["num_attention_heads"],
            "num_key_value_heads": c.get("num_key_value_heads") or c["num_attention_heads"],
            "max_position_embeddings": c.get("max_position_embeddings", 32768),
            "rms_norm_eps": c.get("rms_norm_eps", 1e-6),
            "hidden_act": c.get("hidden_act", "silu"),
            "rope_parameters": rope_parameters(c),
            # InternVLChatConfig forces untied embeddings for every size; the checkpoints ship lm_head.weight.
            "tie_word_embeddings": False,
            "bos_token_id": c.get("bos_token_id"),
            "eos_token_id": c.get("eos_token_id"),
            "pad_token_id": c.get("pad_token_id"),
        }
        if self.llm_architecture == "Qwen2ForCausalLM":
            return Qwen2Config(
                **common,
                use_sliding_window=bool(c.get("use_sliding_window", False)),
                sliding_window=c.get("sliding_window"),
                max_window_layers=c.get("max_window_layers", c["num_hidden_layers"]),
            )
        # InternLM2 is Llama with a fused, grouped wqkv and renamed modules (see services.model.keymap).
        return LlamaConfig(**common, attention_bias=bool(c.get("bias", True)), mlp_bias=False)

    def internvl_hf_config(self) -> InternVLConfig:
        return InternVLConfig(
            vision_config=self.vision_hf_config().to_dict(),
            text_config=self.text_hf_config().to_dict(),
            downsample_ratio=self.downsample_ratio,
            vision_feature_layer=self.select_layer,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
            tie_word_embeddings=False,
        )


def rope_parameters(llm_config: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings from the 4.37-era keys (`rope_theta`, `rope_scaling`) the published configs carry.

    transformers 5 reads `rope_parameters`; a silently dropped `rope_theta` would fall back to 10000 and change
    every output, so the translation is explicit.
    """
    theta = float(llm_config.get("rope_theta", 10000.0))
    scaling = llm_config.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    params: dict[str, Any] = {"rope_type": rope_type, "rope_theta": theta}
    if rope_type != "default":
        params.update({k: v for k, v in scaling.items() if k not in ("type", "rope_type")})
    return params
