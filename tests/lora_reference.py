"""Test-only reference for LoRA-adapter parity: the original InternVL 2.5 checkpoint as a torch module, and ms-swift
style adapters written for it with PEFT itself.

Nothing here imports the project (`services/`): the module is built from the original OpenGVLab weight names with
`reference_impl.read_original`, so that PEFT's own LoRA wrappers, injected at the original module paths, define what
an adapted model computes. A serving path that maps names, fuses or splits projections, or merges adapters must
reproduce these outputs.

- `OriginalInternVL(directory)`: float32 CPU module whose `named_parameters()` are exactly the checkpoint's names;
  `encode_images`, `embed`, `logits` and `greedy` are full, uncached forwards built on its `nn.Linear` submodules.
- `write_swift_adapter(model, root, target_modules=...)`: a random (non-zero) LoRA adapter saved in ms-swift's
  output layout, and the eval-mode PEFT model that is the reference for it.
- `INTERNLM2_TARGETS`, `QWEN2_TARGETS`, `VISION_AND_LANGUAGE_TARGETS`: `target_modules` regexes (PEFT full-matches
  them against module names), the first two as ms-swift writes them for InternVL 2.5's language model.

Calling an adapted model: `peft.get_peft_model` injects the LoRA layers in place into the module it wraps, which stays
reachable as `peft_model.base_model.model` (`unwrap(peft_model)`); that module's `greedy` / `logits` /
`encode_images` then run through the LoRA-wrapped linears. `unwrap(copy.deepcopy(peft_model).merge_and_unload())`
is the same computation with the adapter merged into the base weights.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import peft
import torch
import torch.nn.functional as F
from reference_impl import _norm, _rotate_half, read_original
from torch import nn

# ms-swift's `target_modules` for InternVL 2.5 with train_type lora (its `all-linear` resolved for the LLM only).
INTERNLM2_TARGETS = r"^(language_model(?=\.).*\.(wqkv|wo|w1|w2|w3|output))$"
QWEN2_TARGETS = r"^(language_model(?=\.).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj))$"
# Every nn.Linear of the vision tower and projector as well, for either LLM kind. The vision and projector parts are
# anchored on full paths: a loose `.*\.(1|3)` would also match decoder layers 1 and 3 (`...layers.1`), and PEFT
# rejects modules it cannot wrap; mlp1.0 (LayerNorm) and the patch embedding (Conv2d) are left out on purpose.
VISION_AND_LANGUAGE_TARGETS = (
    r"^(mlp1\.(1|3)"
    r"|vision_model\.encoder\.layers\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
    r"|language_model(?=\.).*\.(wqkv|wo|w1|w2|w3|output|q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj))$"
)

# ms-swift names each run `v<N>-<YYYYMMDD>-<HHMMSS>` and each save `checkpoint-<global step>`.
SWIFT_RUN = "v0-20261202-101010"
SWIFT_STEP = 10


class RMSNorm(nn.Module):
    """weight * x / rms(x) over the last dimension (InternLM2, Qwen2, InternViT-6B), parameter named `weight`."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _norm(x, self.weight, None, "rms_norm", self.eps)


def _linear(n_in: int, n_out: int, bias: bool) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=bias)


def _rope(n: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, head_dim] for positions 0..N-1, the halves layout `_rotate_half` pairs with."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(n, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], -1)
    return angles.cos(), angles.sin()


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> torch.Tensor:
    """q [N, heads, hd], k/v [N, kv_heads, hd] -> [N, heads * hd]: RoPE, then causal GQA in which query head h reads
    kv head h // (heads / kv_heads)."""
    n, heads, hd = q.shape
    q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
    k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
    group = heads // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
    scores = scores + torch.full((n, n), -math.inf).triu(1)
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v).reshape(n, heads * hd)


# -- InternViT ------------------------------------------------------------------------------------------------------

class _VisionEmbeddings(nn.Module):
    def __init__(self, c: int, patch: int, positions: int):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, c))
        self.patch_embedding = nn.Conv2d(3, c, kernel_size=patch, stride=patch)
        self.position_embedding = nn.Parameter(torch.zeros(1, positions, c))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, 448, 448] -> [B, 1 + 1024, C]: CLS first, then patches row-major."""
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.position_embedding  # 448 px: the 32x32 grid needs no interpolation


class _VisionAttention(nn.Module):
    def __init__(self, vc: dict):
        super().__init__()
        c = vc["hidden_size"]
        self.heads = vc["num_attention_heads"]
        self.qkv = _linear(c, 3 * c, vc["qkv_bias"])
        self.proj = _linear(c, c, True)
        if vc["qk_normalization"]:
            self.q_norm = RMSNorm(c, vc["layer_norm_eps"])
            self.k_norm = RMSNorm(c, vc["layer_norm_eps"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, C] -> [B, T, C], bidirectional."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        if hasattr(self, "q_norm"):  # InternViT-6B normalises q and k over all heads at once
            q, k = self.q_norm(q), self.k_norm(k)
        hd = c // self.heads
        q, k, v = (z.reshape(b, t, self.heads, hd).transpose(1, 2) for z in (q, k, v))
        attn = torch.softmax(q @ k.transpose(-1, -2) * hd**-0.5, dim=-1) @ v
        return self.proj(attn.transpose(1, 2).reshape(b, t, c))


class _VisionMLP(nn.Module):
    def __init__(self, c: int, intermediate: int):
        super().__init__()
        self.fc1 = _linear(c, intermediate, True)
        self.fc2 = _linear(intermediate, c, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _VisionLayer(nn.Module):
    def __init__(self, vc: dict):
        super().__init__()
        c, eps = vc["hidden_size"], vc["layer_norm_eps"]
        layer_norm = vc["norm_type"] == "layer_norm"
        self.norm1 = nn.LayerNorm(c, eps=eps) if layer_norm else RMSNorm(c, eps)
        self.norm2 = nn.LayerNorm(c, eps=eps) if layer_norm else RMSNorm(c, eps)
        self.attn = _VisionAttention(vc)
        self.mlp = _VisionMLP(c, vc["intermediate_size"])
        self.ls1 = nn.Parameter(torch.ones(c))  # layer scales, stored as bare parameters `...layers.N.ls1`
        self.ls2 = nn.Parameter(torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1 * self.attn(self.norm1(x))
        return x + self.ls2 * self.mlp(self.norm2(x))


class _VisionEncoder(nn.Module):
    def __init__(self, vc: dict):
        super().__init__()
        self.layers = nn.ModuleList(_VisionLayer(vc) for _ in range(vc["num_hidden_layers"]))


class _VisionModel(nn.Module):
    def __init__(self, vc: dict):
        super().__init__()
        grid = vc["image_size"] // vc["patch_size"]
        self.embeddings = _VisionEmbeddings(vc["hidden_size"], vc["patch_size"], grid * grid + 1)
        self.encoder = _VisionEncoder(vc)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, 448, 448] -> last hidden state [B, 1025, C] (select_layer -1)."""
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        return x


# -- InternLM2 and Qwen2 decoder layers -------------------------------------------------------------------------------

class _InternLM2Attention(nn.Module):
    def __init__(self, lc: dict):
        super().__init__()
        hidden, self.nh, self.nkv = lc["hidden_size"], lc["num_attention_heads"], lc["num_key_value_heads"]
        self.hd = hidden // self.nh
        self.wqkv = _linear(hidden, (self.nh + 2 * self.nkv) * self.hd, lc.get("bias", False))
        self.wo = _linear(self.nh * self.hd, hidden, lc.get("bias", False))

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n, group = h.shape[0], self.nh // self.nkv
        # wqkv's rows are grouped per kv head: [q x group, k, v] for each of the nkv groups.
        qkv = self.wqkv(h).reshape(n, self.nkv, group + 2, self.hd)
        q = qkv[:, :, :group].reshape(n, self.nh, self.hd)
        k, v = qkv[:, :, group], qkv[:, :, group + 1]
        return self.wo(_causal_attention(q, k, v, cos, sin))


class _InternLM2FeedForward(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.w1 = _linear(hidden, intermediate, False)  # gate
        self.w3 = _linear(hidden, intermediate, False)  # up
        self.w2 = _linear(intermediate, hidden, False)  # down

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(h)) * self.w3(h))


class _InternLM2Layer(nn.Module):
    def __init__(self, lc: dict):
        super().__init__()
        self.attention = _InternLM2Attention(lc)
        self.feed_forward = _InternLM2FeedForward(lc["hidden_size"], lc["intermediate_size"])
        self.attention_norm = RMSNorm(lc["hidden_size"], lc["rms_norm_eps"])
        self.ffn_norm = RMSNorm(lc["hidden_size"], lc["rms_norm_eps"])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class _Qwen2Attention(nn.Module):
    def __init__(self, lc: dict):
        super().__init__()
        hidden, self.nh, self.nkv = lc["hidden_size"], lc["num_attention_heads"], lc["num_key_value_heads"]
        self.hd = hidden // self.nh
        self.q_proj = _linear(hidden, self.nh * self.hd, True)  # Qwen2: biases on q, k, v only
        self.k_proj = _linear(hidden, self.nkv * self.hd, True)
        self.v_proj = _linear(hidden, self.nkv * self.hd, True)
        self.o_proj = _linear(self.nh * self.hd, hidden, False)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = h.shape[0]
        q = self.q_proj(h).reshape(n, self.nh, self.hd)
        k = self.k_proj(h).reshape(n, self.nkv, self.hd)
        v = self.v_proj(h).reshape(n, self.nkv, self.hd)
        return self.o_proj(_causal_attention(q, k, v, cos, sin))


class _Qwen2MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = _linear(hidden, intermediate, False)
        self.up_proj = _linear(hidden, intermediate, False)
        self.down_proj = _linear(intermediate, hidden, False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class _Qwen2Layer(nn.Module):
    def __init__(self, lc: dict):
        super().__init__()
        self.self_attn = _Qwen2Attention(lc)
        self.mlp = _Qwen2MLP(lc["hidden_size"], lc["intermediate_size"])
        self.input_layernorm = RMSNorm(lc["hidden_size"], lc["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(lc["hidden_size"], lc["rms_norm_eps"])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Decoder(nn.Module):
    """`language_model.model`: embeddings (`tok_embeddings` for InternLM2, `embed_tokens` for Qwen2), layers, norm."""

    def __init__(self, lc: dict, internlm2: bool):
        super().__init__()
        embedding = nn.Embedding(lc["vocab_size"], lc["hidden_size"])
        if internlm2:
            self.tok_embeddings = embedding
        else:
            self.embed_tokens = embedding
        layer = _InternLM2Layer if internlm2 else _Qwen2Layer
        self.layers = nn.ModuleList(layer(lc) for _ in range(lc["num_hidden_layers"]))
        self.norm = RMSNorm(lc["hidden_size"], lc["rms_norm_eps"])


class _LanguageModel(nn.Module):
    """`language_model`: `model` plus the LM head, `output` (InternLM2) or `lm_head` (Qwen2)."""

    def __init__(self, lc: dict, internlm2: bool, has_head: bool):
        super().__init__()
        self.model = _Decoder(lc, internlm2)
        self.head_name = "output" if internlm2 else "lm_head"
        if has_head:  # else tied: attached after loading, sharing the embedding matrix
            setattr(self, self.head_name, _linear(lc["hidden_size"], lc["vocab_size"], False))

    @property
    def embedding(self) -> nn.Embedding:
        return self.model.tok_embeddings if hasattr(self.model, "tok_embeddings") else self.model.embed_tokens

    @property
    def head(self) -> nn.Module:
        return getattr(self, self.head_name)


# -- the whole model ---------------------------------------------------------------------------------------------------

class OriginalInternVL(nn.Module):
    """An original-format InternVL 2.5 checkpoint (InternViT-300M/6B + mlp1 + InternLM2 or Qwen2), float32 on CPU.

    Submodules sit at the checkpoint's paths, so `dict(self.named_parameters())` has exactly the checkpoint's weight
    names; every projection is an `nn.Linear` called as a module, so LoRA layers PEFT injects take effect. Forwards
    are single-sequence and uncached: `logits` recomputes the whole prefix.

    `chat_config` is the checkpoint's config.json (not called `config`: PEFT reads a `config` attribute as a
    transformers config). InternLM2's dynamic-NTK `rope_scaling` only acts past max_position_embeddings (32k), far
    beyond what these tests run, and is not implemented.
    """

    def __init__(self, directory: str | Path):
        super().__init__()
        config, weights = read_original(Path(directory))
        self.chat_config = config
        self.name_or_path = str(directory)  # PEFT records it as adapter_config.json's base_model_name_or_path
        vc, lc = config["vision_config"], config["llm_config"]
        self.internlm2 = lc["architectures"][0] == "InternLM2ForCausalLM"
        self.llm_config = lc
        self.head_dim = lc["hidden_size"] // lc["num_attention_heads"]
        head_name = "language_model.output.weight" if self.internlm2 else "language_model.lm_head.weight"
        tied = head_name not in weights
        if tied and not (lc.get("tie_word_embeddings") or config.get("tie_word_embeddings")):
            raise ValueError(f"{directory}: no {head_name} and the config does not tie word embeddings")

        c = vc["hidden_size"]
        self.vision_model = _VisionModel(vc)
        # Pixel shuffle v2 folds 2x2 patches into one token of width 4C; mlp1 maps it to the LLM width.
        self.mlp1 = nn.Sequential(nn.LayerNorm(4 * c), _linear(4 * c, lc["hidden_size"], True), nn.GELU(),
                                  _linear(lc["hidden_size"], lc["hidden_size"], True))
        self.language_model = _LanguageModel(lc, self.internlm2, has_head=not tied)
        self.load_state_dict(weights, strict=True)
        if tied:  # the module then shares the embedding's Parameter; named_parameters() lists it once, as stored
            head = _linear(lc["hidden_size"], lc["vocab_size"], False)
            head.weight = self.language_model.embedding.weight
            setattr(self.language_model, self.language_model.head_name, head)
        self.requires_grad_(False)
        self.eval()

    def prepare_inputs_for_generation(self, *args, **kwargs):
        """PEFT's CAUSAL_LM wrapper looks this up when it wraps a model; generation here is `greedy`."""
        raise NotImplementedError("use OriginalInternVL.greedy")

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, 448, 448] (normalised tiles) -> image embeddings [B, 256, llm_hidden]."""
        x = self.vision_model(pixel_values)
        b, _, c = x.shape
        side = math.isqrt(x.shape[1] - 1)
        grid = x[:, 1:].reshape(b, side, side, c)  # CLS dropped; (row, col)
        # Pixel shuffle v2: token (side/2) i + j holds the 2x2 block at (2i, 2j) in reading order.
        shuffled = torch.cat([grid[:, 0::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 0::2], grid[:, 1::2, 1::2]],
                             dim=-1)
        return self.mlp1(shuffled.reshape(b, (side // 2) ** 2, 4 * c))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [N] (int64) -> token embeddings [N, llm_hidden]."""
        return self.language_model.embedding(input_ids)

    def logits(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """inputs_embeds [N, llm_hidden] (positions 0..N-1) -> logits [N, vocab], float32, causal, no KV cache."""
        n = inputs_embeds.shape[0]
        cos, sin = _rope(n, self.head_dim, self.llm_config["rope_theta"])
        x = inputs_embeds
        for layer in self.language_model.model.layers:
            x = layer(x, cos, sin)
        return self.language_model.head(self.language_model.model.norm(x))

    @torch.no_grad()
    def greedy(self, inputs_embeds: torch.Tensor, max_new_tokens: int, stop_id: int | None = None,
               top_k: int = 5) -> tuple[list[int], list[list[tuple[int, float]]]]:
        """Greedy decoding from a prompt inputs_embeds [N, llm_hidden], recomputing the full forward every step.

        Returns (tokens, top): the generated ids, ending with stop_id if it was generated (else max_new_tokens of
        them), and for each generated position the top_k (token_id, logprob) pairs, best first, from the
        log_softmax of that position's float32 logits.
        """
        embeds = inputs_embeds
        tokens: list[int] = []
        top: list[list[tuple[int, float]]] = []
        for _ in range(max_new_tokens):
            logprobs = torch.log_softmax(self.logits(embeds)[-1].float(), dim=-1)
            values, ids = logprobs.topk(top_k)
            token = int(logprobs.argmax())
            tokens.append(token)
            top.append([(int(i), float(v)) for i, v in zip(ids, values, strict=True)])
            if token == stop_id:
                break
            embeds = torch.cat([embeds, self.embed(torch.tensor([token]))])
        return tokens, top


def unwrap(model: nn.Module) -> OriginalInternVL:
    """The OriginalInternVL inside a PEFT model (`peft_model.base_model.model`), or the model itself."""
    while not isinstance(model, OriginalInternVL):
        model = model.base_model.model if isinstance(model, peft.PeftModel) else model.model
    return model


# -- ms-swift adapters -------------------------------------------------------------------------------------------------

def write_swift_adapter(model: OriginalInternVL, root: Path, *, target_modules: str | list[str], r: int = 8,
                        lora_alpha: int = 32, use_rslora: bool = False, seed: int = 0,
                        std: float = 0.02) -> tuple[Path, peft.PeftModel]:
    """A random LoRA adapter for `model`, saved where ms-swift's `swift sft --train_type lora` puts one.

    `model` is deep-copied, so it stays the unadapted base. The copy is wrapped with PEFT, every lora_A / lora_B
    weight is drawn from N(0, std^2) with a generator seeded by `seed` (PEFT starts B at zero, a no-op adapter), and
    the wrapped model is put in eval mode (dropout off) before saving to
    `root/v0-20261202-101010/checkpoint-10/`: adapter_config.json and adapter_model.safetensors as PEFT writes them
    (keys like `base_model.model.language_model.model.layers.0.attention.wqkv.lora_A.weight`), plus ms-swift's
    args.json, additional_config.json and trainer_state.json.

    Returns (checkpoint_dir, peft_model); `unwrap(peft_model)` (its `base_model.model`) runs the adapted forwards.
    """
    lora = peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=0.05, target_modules=target_modules,
                           use_rslora=use_rslora, task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(copy.deepcopy(model), lora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.normal_(0.0, std, generator=generator)
    wrapped.requires_grad_(False)  # a fixed reference, never trained: outputs carry no autograd graph
    wrapped.eval()

    run = Path(root) / SWIFT_RUN
    checkpoint = run / f"checkpoint-{SWIFT_STEP}"
    wrapped.save_pretrained(checkpoint)
    regex = isinstance(target_modules, str)
    args = {
        "model": model.name_or_path,
        "model_type": "internvl2_5",
        "template": "internvl2_5",
        "train_type": "lora",
        "torch_dtype": "float32",
        # ms-swift keeps the user's module list here and a resolved regex in target_regex, which overrides it.
        "target_modules": ["all-linear"] if regex else list(target_modules),
        "target_regex": target_modules if regex else None,
        "lora_rank": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": 0.05,
        "lora_bias": "none",
        "lora_dtype": None,
        "use_rslora": use_rslora,
        "use_dora": False,
        "freeze_llm": False,
        "freeze_vit": True,
        "freeze_aligner": True,
        "seed": seed,
        "output_dir": str(run),
        "max_steps": SWIFT_STEP,
    }
    for directory in (run, checkpoint):  # ms-swift writes args.json in the run and in each checkpoint
        (directory / "args.json").write_text(json.dumps(args, indent=2))
    (checkpoint / "additional_config.json").write_text(
        json.dumps({"lora_dtype": None, "lorap_lr_ratio": None, "lorap_emb_lr": 1e-06}))
    trainer_state = {
        "best_metric": None, "best_model_checkpoint": None, "epoch": 1.0, "eval_steps": 500,
        "global_step": SWIFT_STEP, "is_hyper_param_search": False, "is_local_process_zero": True,
        "is_world_process_zero": True, "log_history": [{"epoch": 1.0, "loss": 1.0, "step": SWIFT_STEP}],
        "logging_steps": 5, "max_steps": SWIFT_STEP, "num_input_tokens_seen": 0, "num_train_epochs": 1,
        "save_steps": SWIFT_STEP, "total_flos": 0.0, "train_batch_size": 1, "trial_name": None, "trial_params": None,
    }
    (checkpoint / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    return checkpoint, wrapped
