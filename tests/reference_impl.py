"""Independent implementations used only by tests: written from the model card's description of InternVL 2.5, sharing no code
with the project's loader or key mapping.

- `internvit_forward`: InternViT + pixel shuffle (v2) + mlp1 straight from the original weight names.
- `internlm2_logits`: an InternLM2 forward with the fused, grouped `wqkv` and w1/w3/w2 feed-forward.
- `to_native_state_dict`: original names -> transformers' native InternVLForConditionalGeneration names, written the
  way transformers' convert_internvl_weights_to_hf.py does it (its script is not shipped in the wheel).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import InternVLConfig, InternVLVisionConfig, LlamaConfig, Qwen2Config


def read_original(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, every weight as float32 under its original name), reading the shards directly."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as reader:
            for key in reader.keys():  # noqa: SIM118 - safe_open is not iterable
                weights[key] = reader.get_tensor(key).float()
    return config, weights


# -- InternViT from the spec ------------------------------------------------------------------------------------

def _norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kind: str, eps: float) -> torch.Tensor:
    if kind == "layer_norm":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def internvit_forward(config: dict, w: dict[str, torch.Tensor], pixel_values: torch.Tensor) -> torch.Tensor:
    """pixel_values [B, 3, 448, 448] -> [B, 256, llm_hidden], float32."""
    vc = config["vision_config"]
    c, heads = vc["hidden_size"], vc["num_attention_heads"]
    hd = c // heads
    eps, kind = vc["layer_norm_eps"], vc["norm_type"]
    p = "vision_model."
    x = F.conv2d(pixel_values, w[p + "embeddings.patch_embedding.weight"], w[p + "embeddings.patch_embedding.bias"],
                 stride=vc["patch_size"])
    b = x.shape[0]
    x = x.flatten(2).transpose(1, 2)  # [B, 1024, C], patches row-major
    x = torch.cat([w[p + "embeddings.class_embedding"].expand(b, -1, -1), x], dim=1)
    x = x + w[p + "embeddings.position_embedding"]  # 448 px: the 32x32 grid needs no interpolation
    for n in range(vc["num_hidden_layers"]):
        lp = f"{p}encoder.layers.{n}."
        h = _norm(x, w[lp + "norm1.weight"], w.get(lp + "norm1.bias"), kind, eps)
        qkv = h @ w[lp + "attn.qkv.weight"].T
        if vc["qkv_bias"]:
            qkv = qkv + w[lp + "attn.qkv.bias"]
        q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
        if vc["qk_normalization"]:
            q = _norm(q, w[lp + "attn.q_norm.weight"], None, "rms_norm", eps)
            k = _norm(k, w[lp + "attn.k_norm.weight"], None, "rms_norm", eps)
        q, k, v = (t.reshape(b, -1, heads, hd).transpose(1, 2) for t in (q, k, v))
        attn = torch.softmax(q @ k.transpose(-1, -2) * hd**-0.5, dim=-1) @ v
        attn = attn.transpose(1, 2).reshape(b, -1, c)
        x = x + w[lp + "ls1"] * (attn @ w[lp + "attn.proj.weight"].T + w[lp + "attn.proj.bias"])
        h = _norm(x, w[lp + "norm2.weight"], w.get(lp + "norm2.bias"), kind, eps)
        h = F.gelu(h @ w[lp + "mlp.fc1.weight"].T + w[lp + "mlp.fc1.bias"])
        x = x + w[lp + "ls2"] * (h @ w[lp + "mlp.fc2.weight"].T + w[lp + "mlp.fc2.bias"])
    grid = x[:, 1:].reshape(b, 32, 32, c)  # CLS dropped; (row, col)
    # Pixel shuffle v2, spelled out: token 16 i + j holds the 2x2 block at (2i, 2j) in reading order.
    shuffled = torch.cat([grid[:, 0::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 0::2], grid[:, 1::2, 1::2]], dim=-1)
    tokens = shuffled.reshape(b, 256, 4 * c)
    h = F.layer_norm(tokens, (4 * c,), w["mlp1.0.weight"], w["mlp1.0.bias"], 1e-5)
    h = F.gelu(h @ w["mlp1.1.weight"].T + w["mlp1.1.bias"])
    return h @ w["mlp1.3.weight"].T + w["mlp1.3.bias"]


# -- InternLM2 from the spec ------------------------------------------------------------------------------------

def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def internlm2_logits(config: dict, w: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids [1, N] -> logits [1, N, vocab], float32, for N well below max_position_embeddings."""
    lc = config["llm_config"]
    hidden, nh, nkv = lc["hidden_size"], lc["num_attention_heads"], lc["num_key_value_heads"]
    hd, group, eps = hidden // nh, nh // nkv, lc["rms_norm_eps"]
    p = "language_model.model."
    x = w[p + "tok_embeddings.weight"][input_ids[0]]  # [N, hidden]
    n = x.shape[0]
    inv_freq = 1.0 / (lc["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    angles = torch.outer(torch.arange(n, dtype=torch.float32), inv_freq)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    causal = torch.full((n, n), -math.inf).triu(1)
    for layer in range(lc["num_hidden_layers"]):
        lp = f"{p}layers.{layer}."
        h = _norm(x, w[lp + "attention_norm.weight"], None, "rms_norm", eps)
        qkv = (h @ w[lp + "attention.wqkv.weight"].T).reshape(n, nkv, group + 2, hd)
        q = qkv[:, :, :group].reshape(n, nh, hd)  # query head h belongs to kv group h // group
        k, v = qkv[:, :, group], qkv[:, :, group + 1]  # [N, nkv, hd]
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        outs = []
        for head in range(nh):
            kv = head // group
            scores = q[:, head] @ k[:, kv].T / math.sqrt(hd) + causal
            outs.append(torch.softmax(scores, -1) @ v[:, kv])
        x = x + torch.cat(outs, -1) @ w[lp + "attention.wo.weight"].T
        h = _norm(x, w[lp + "ffn_norm.weight"], None, "rms_norm", eps)
        gate, up = h @ w[lp + "feed_forward.w1.weight"].T, h @ w[lp + "feed_forward.w3.weight"].T
        x = x + (F.silu(gate) * up) @ w[lp + "feed_forward.w2.weight"].T
    x = _norm(x, w[p + "norm.weight"], None, "rms_norm", eps)
    return (x @ w["language_model.output.weight"].T)[None]


# -- transformers' native InternVL ------------------------------------------------------------------------------

_NATIVE_VISION = [
    ("vision_model.embeddings.class_embedding", "model.vision_tower.embeddings.cls_token"),
    ("vision_model.embeddings.position_embedding", "model.vision_tower.embeddings.position_embeddings"),
    ("vision_model.embeddings.patch_embedding", "model.vision_tower.embeddings.patch_embeddings.projection"),
    ("vision_model.encoder.layers", "model.vision_tower.encoder.layer"),
    (".ls1", ".lambda_1"), (".ls2", ".lambda_2"),
    (".norm1", ".layernorm_before"), (".norm2", ".layernorm_after"),
    (".attn.proj", ".attention.projection_layer"),
    (".attn.q_norm", ".attention.q_norm"), (".attn.k_norm", ".attention.k_norm"),
    ("mlp1.0", "model.multi_modal_projector.layer_norm"),
    ("mlp1.1", "model.multi_modal_projector.linear_1"),
    ("mlp1.3", "model.multi_modal_projector.linear_2"),
]
_NATIVE_INTERNLM2 = [
    ("language_model.output", "lm_head"),
    ("language_model.model.tok_embeddings", "model.language_model.embed_tokens"),
    ("language_model.model.", "model.language_model."),
    (".attention.wo", ".self_attn.o_proj"),
    (".feed_forward.w1", ".mlp.gate_proj"), (".feed_forward.w3", ".mlp.up_proj"), (".feed_forward.w2", ".mlp.down_proj"),
    (".attention_norm", ".input_layernorm"), (".ffn_norm", ".post_attention_layernorm"),
]


def to_native_state_dict(config: dict, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    lc = config["llm_config"]
    internlm2 = lc["architectures"][0] == "InternLM2ForCausalLM"
    out: dict[str, torch.Tensor] = {}
    for name, tensor in w.items():
        if name.startswith(("vision_model.", "mlp1.")):
            for old, new in _NATIVE_VISION:
                name = name.replace(old, new)
            if ".attn.qkv." in name:
                c = tensor.shape[0] // 3
                for i, part in enumerate("qkv"):
                    out[name.replace(".attn.qkv.", f".attention.{part}_proj.")] = tensor[i * c:(i + 1) * c]
                continue
            out[name] = tensor
        elif not internlm2:
            name = "lm_head.weight" if name == "language_model.lm_head.weight" else name.replace(
                "language_model.model.", "model.language_model.")
            out[name] = tensor
        else:
            for old, new in _NATIVE_INTERNLM2:
                name = name.replace(old, new)
            if ".attention.wqkv." in name:
                nh, nkv = lc["num_attention_heads"], lc["num_key_value_heads"]
                hd, g = lc["hidden_size"] // nh, nh // nkv
                rows = tensor.reshape(nkv, g + 2, hd, -1)
                prefix = name.replace(".attention.wqkv.weight", ".self_attn.")
                out[prefix + "q_proj.weight"] = rows[:, :g].reshape(nh * hd, -1)
                out[prefix + "k_proj.weight"] = rows[:, g].reshape(nkv * hd, -1)
                out[prefix + "v_proj.weight"] = rows[:, g + 1].reshape(nkv * hd, -1)
                continue
            out[name] = tensor
    return out


def native_config(config: dict, image_token_id: int = 151667) -> InternVLConfig:
    """transformers' InternVLConfig for an original config.json, as the converter builds it; `image_token_id` is the
    tokenizer's `<IMG_CONTEXT>` (the Qwen2 tokenizers' by default)."""
    vc, lc = config["vision_config"], config["llm_config"]
    vision = InternVLVisionConfig(
        hidden_size=vc["hidden_size"], num_hidden_layers=vc["num_hidden_layers"],
        num_attention_heads=vc["num_attention_heads"], intermediate_size=vc["intermediate_size"],
        attention_bias=vc["qkv_bias"], use_qk_norm=vc["qk_normalization"], norm_type=vc["norm_type"],
        layer_norm_eps=vc["layer_norm_eps"], image_size=448, patch_size=14, use_mean_pooling=True)
    scaling = lc.get("rope_scaling") or {}
    rope = {"rope_type": scaling.get("type", "default"), "rope_theta": lc["rope_theta"]}
    if "factor" in scaling:
        rope["factor"] = scaling["factor"]
    common = {"vocab_size": lc["vocab_size"], "hidden_size": lc["hidden_size"],
              "intermediate_size": lc["intermediate_size"], "num_hidden_layers": lc["num_hidden_layers"],
              "num_attention_heads": lc["num_attention_heads"], "num_key_value_heads": lc["num_key_value_heads"],
              "rms_norm_eps": lc["rms_norm_eps"], "max_position_embeddings": lc["max_position_embeddings"],
              "rope_parameters": rope, "tie_word_embeddings": False}
    if lc["architectures"][0] == "InternLM2ForCausalLM":
        text = LlamaConfig(**common, attention_bias=False)
    else:
        text = Qwen2Config(**common)
    return InternVLConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=image_token_id,
                          downsample_ratio=0.5, tie_word_embeddings=False)
