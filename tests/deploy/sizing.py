"""The README's sizing table, computed: for each InternVL 2.5 size, its parameters from the published configs' shapes
(checked against the InternVL 2.5 report's totals), bf16 weight memory, KV per token, embeddings per tile, the GPUs
an LLM pod needs and the KV that leaves.

Computed: parameters from the shapes (embeddings and the separate output head, attention with grouped KV heads and
Qwen2's q/k/v biases, the gated MLP, norms; InternViT's patch and position embeddings, layers with layer scale,
LayerNorm or RMSNorm with qk-norm; the projector), 2 bytes per weight and per KV or embedding value (bf16), KV per
token = 2 x layers x KV heads x head size x 2 bytes, embeddings per tile = 256 x hidden x 2 bytes.

Assumed: 80 GB GPUs (H100, A100 80GB) of which vLLM uses 90% (its default `gpu_memory_utilization`); an LLM pod holds
its weights plus the KV of `KV_TOKENS_PER_POD` tokens (the default `--max-batch-size` of 32 sequences at 8,192 tokens
each), with the activations, CUDA graphs and NCCL buffers inside the 10% vLLM leaves; tensor parallelism over 1, 2, 4
or 8 GPUs that divide the attention and KV heads. The shapes of 38B and 78B (vocabulary) and of InternViT-6B V2.5
(that of V1.5) are the reference's inferences, which the report's totals bear out.
"""

from __future__ import annotations

from dataclasses import dataclass

GPU_BYTES = 80e9
GPU_SHARE = 0.9
KV_TOKENS_PER_POD = 32 * 8192
TENSOR_PARALLEL = (1, 2, 4, 8)
TOKENS_PER_TILE = 256
BYTES = 2  # bf16


@dataclass(frozen=True)
class Vit:
    name: str
    hidden: int
    layers: int
    intermediate: int
    qkv_bias: bool
    rms_norm: bool  # RMSNorm with qk-norm (6B) or LayerNorm (300M)

    def params(self) -> int:
        h, i = self.hidden, self.intermediate
        embeddings = 3 * 14 * 14 * h + h + (1024 + 1) * h + h  # patch conv, its bias, positions, class token
        norm = h if self.rms_norm else 2 * h
        layer = (3 * h * h + (3 * h if self.qkv_bias else 0) + h * h + h  # qkv, proj
                 + h * i + i + i * h + h  # fc1, fc2
                 + 2 * norm + 2 * h + (2 * h if self.rms_norm else 0))  # norm1/2, ls1/2, q/k norms
        return embeddings + self.layers * layer


VIT_300M = Vit("InternViT-300M", 1024, 24, 4096, qkv_bias=True, rms_norm=False)
VIT_6B = Vit("InternViT-6B", 3200, 45, 12800, qkv_bias=False, rms_norm=True)


@dataclass(frozen=True)
class Size:
    name: str
    llm: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    qkv_bias: bool
    vit: Vit
    report_params_b: float  # the InternVL 2.5 report's total, billions

    @property
    def head_size(self) -> int:
        return self.hidden // self.heads

    def llm_params(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_size
        attention = h * h + 2 * h * kv + h * h + ((h + 2 * kv) if self.qkv_bias else 0)
        return 2 * self.vocab * h + self.layers * (attention + 3 * h * self.intermediate + 2 * h) + h

    def vision_params(self) -> int:
        v = 4 * self.vit.hidden  # the pixel shuffle's channels
        return self.vit.params() + 2 * v + v * self.hidden + self.hidden + self.hidden * self.hidden + self.hidden

    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_size * BYTES

    def embedding_bytes_per_tile(self) -> int:
        return TOKENS_PER_TILE * self.hidden * BYTES

    def kv_tokens(self, gpus: int) -> int:
        """Tokens of KV an LLM pod of `gpus` GPUs holds beside its weights."""
        return int((GPU_BYTES * GPU_SHARE * gpus - self.llm_params() * BYTES) // self.kv_bytes_per_token())

    def llm_gpus(self) -> int:
        """The smallest tensor-parallel size that divides the heads and holds the weights and KV_TOKENS_PER_POD."""
        return next(n for n in TENSOR_PARALLEL if self.heads % n == 0 and self.kv_heads % n == 0
                    and self.kv_tokens(n) >= KV_TOKENS_PER_POD)


SIZES = (
    Size("1B", "Qwen2.5-0.5B", 896, 24, 14, 2, 4864, 151674, True, VIT_300M, 0.9),
    Size("2B", "InternLM2.5-1.8B", 2048, 24, 16, 8, 8192, 92553, False, VIT_300M, 2.2),
    Size("4B", "Qwen2.5-3B", 2048, 36, 16, 2, 11008, 151674, True, VIT_300M, 3.7),
    Size("8B", "InternLM2.5-7B", 4096, 32, 32, 8, 14336, 92553, False, VIT_300M, 8.1),
    Size("26B", "InternLM2.5-20B", 6144, 48, 48, 8, 16384, 92553, False, VIT_6B, 25.5),
    Size("38B", "Qwen2.5-32B", 5120, 64, 40, 8, 27648, 151674, True, VIT_6B, 38.4),
    Size("78B", "Qwen2.5-72B", 8192, 80, 64, 8, 29568, 151674, True, VIT_6B, 78.4),
)


def row(size: Size) -> list[str]:
    """The README table's cells for `size`."""
    gpus = size.llm_gpus()
    return [f"InternVL2_5-{size.name}", f"{size.llm} ({size.llm_params() / 1e9:.2f}B)",
            f"{size.vit.name} ({size.vision_params() / 1e9:.2f}B)", f"{size.llm_params() * BYTES / 1e9:.1f} GB",
            str(gpus), f"{size.vision_params() * BYTES / 1e9:.1f} GB", f"{size.kv_bytes_per_token() // 1024} KiB",
            f"{size.kv_tokens(gpus) // 1000:,}k", f"{size.embedding_bytes_per_tile() / 2**20:g} MiB"]


HEADER = ["model", "language model (parameters)", "vision tower (parameters, with the projector)",
          "LLM weights (bf16)", "GPUs per LLM pod", "vision weights (bf16)", "KV per token",
          "KV per LLM pod (tokens)", "embeddings per tile"]


def table() -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(row(size)) + " |" for size in SIZES])


if __name__ == "__main__":
    print(table())
