"""Original OpenGVLab weight names -> the names of transformers' modules the project computes with.

Vision tower and projector land on `InternVLVisionModel` + `InternVLMultiModalProjector` (prefixes `vision_tower.` and
`multi_modal_projector.`), the language model on `Qwen2ForCausalLM` or, for InternLM2, `LlamaForCausalLM`. Fused
tensors (InternViT's `qkv`, InternLM2's grouped `wqkv`) are split here. Pure functions of (name, tensor): the loader
streams shards through them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from services.contract.errors import CheckpointError

VISION_PREFIXES = ("vision_model.", "mlp1.")
LANGUAGE_PREFIX = "language_model."

# (pattern on the original name, replacement) applied in order; the first match wins.
_VISION_RENAMES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^vision_model\.embeddings\.class_embedding$"), "vision_tower.embeddings.cls_token"),
    (re.compile(r"^vision_model\.embeddings\.position_embedding$"), "vision_tower.embeddings.position_embeddings"),
    (re.compile(r"^vision_model\.embeddings\.patch_embedding\.(weight|bias)$"),
     r"vision_tower.embeddings.patch_embeddings.projection.\1"),
    (re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.ls1$"), r"vision_tower.encoder.layer.\1.lambda_1"),
    (re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.ls2$"), r"vision_tower.encoder.layer.\1.lambda_2"),
    (re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.norm1\.(weight|bias)$"),
     r"vision_tower.encoder.layer.\1.layernorm_before.\2"),
    (re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.norm2\.(weight|bias)$"),
     r"vision_tower.encoder.layer.\1.layernorm_after.\2"),
    (re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.(weight|bias)$"),
     r"vision_tower.encoder.layer.\1.attention.projection_layer.\2"),
    (re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.attn\.(q|k)_norm\.weight$"),
     r"vision_tower.encoder.layer.\1.attention.\2_norm.weight"),
    (re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$"),
     r"vision_tower.encoder.layer.\1.mlp.\2.\3"),
    (re.compile(r"^mlp1\.0\.(weight|bias)$"), r"multi_modal_projector.layer_norm.\1"),
    (re.compile(r"^mlp1\.1\.(weight|bias)$"), r"multi_modal_projector.linear_1.\1"),
    (re.compile(r"^mlp1\.3\.(weight|bias)$"), r"multi_modal_projector.linear_2.\1"),
]
_VISION_QKV = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")

_INTERNLM2_RENAMES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^model\.tok_embeddings\.weight$"), "model.embed_tokens.weight"),
    (re.compile(r"^output\.weight$"), "lm_head.weight"),
    (re.compile(r"^model\.norm\.weight$"), "model.norm.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.attention\.wo\.weight$"), r"model.layers.\1.self_attn.o_proj.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.feed_forward\.w1\.weight$"), r"model.layers.\1.mlp.gate_proj.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.feed_forward\.w3\.weight$"), r"model.layers.\1.mlp.up_proj.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.feed_forward\.w2\.weight$"), r"model.layers.\1.mlp.down_proj.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.attention_norm\.weight$"), r"model.layers.\1.input_layernorm.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.ffn_norm\.weight$"), r"model.layers.\1.post_attention_layernorm.weight"),
]
_INTERNLM2_WQKV = re.compile(r"^model\.layers\.(\d+)\.attention\.wqkv\.weight$")


def _rename(name: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, replacement in rules:
        if pattern.match(name):
            return pattern.sub(replacement, name)
    return None


def map_vision(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """One original vision/projector weight -> one or more `InternVLVisionPath` weights.

    `attn.qkv` is [3C, C] (rows [q; k; v], heads head-major inside each block), split into three [C, C].
    """
    if match := _VISION_QKV.match(name):
        layer, kind = match.groups()
        for part, chunk in zip("qkv", tensor.chunk(3, dim=0), strict=True):
            yield f"vision_tower.encoder.layer.{layer}.attention.{part}_proj.{kind}", chunk
        return
    if (target := _rename(name, _VISION_RENAMES)) is None:
        raise CheckpointError(f"unexpected vision weight {name!r}")
    yield target, tensor


def map_qwen2(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Qwen2 weights are already `Qwen2ForCausalLM` names once `language_model.` is stripped."""
    yield name.removeprefix(LANGUAGE_PREFIX), tensor


def split_internlm2_wqkv(wqkv: torch.Tensor, num_heads: int, num_kv_heads: int) -> tuple[torch.Tensor, ...]:
    """InternLM2's grouped wqkv [(nh + 2 nkv) hd, hidden] -> q [nh hd, hidden], k, v [nkv hd, hidden].

    Rows are laid out (kv head, slot, d) with g = nh / nkv query slots, then one key and one value slot per group.
    """
    rows, hidden = wqkv.shape
    group = num_heads // num_kv_heads
    head_dim = rows // (num_heads + 2 * num_kv_heads)
    grouped = wqkv.reshape(num_kv_heads, group + 2, head_dim, hidden)
    q = grouped[:, :group].reshape(num_heads * head_dim, hidden)
    k = grouped[:, -2].reshape(num_kv_heads * head_dim, hidden)
    v = grouped[:, -1].reshape(num_kv_heads * head_dim, hidden)
    return q, k, v


def internlm2_mapper(num_heads: int, num_kv_heads: int):
    """A mapper for InternLM2 weights onto `LlamaForCausalLM` names (no biases anywhere in InternVL 2.5's)."""

    def map_internlm2(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        name = name.removeprefix(LANGUAGE_PREFIX)
        if match := _INTERNLM2_WQKV.match(name):
            layer = match.group(1)
            for part, chunk in zip("qkv", split_internlm2_wqkv(tensor, num_heads, num_kv_heads), strict=True):
                yield f"model.layers.{layer}.self_attn.{part}_proj.weight", chunk
            return
        if (target := _rename(name, _INTERNLM2_RENAMES)) is None:
            raise CheckpointError(f"unexpected InternLM2 weight {LANGUAGE_PREFIX}{name!r}")
        yield target, tensor

    return map_internlm2
