"""The machine: what it is, which dtype to benchmark in, its measured limits, and resident memory of processes.

Limits are measured with torch in the benchmark's dtype, as the issue asks: the memory read bandwidth (the best of a
full reduction and a matrix-vector product over a buffer far larger than any cache) and the matrix throughput (the
best of a few square matrix products). The floors of scenario 7 are analytic: the bytes a single-stream decode step
must read and the FLOPs one 448-pixel tile costs in InternViT + pixel shuffle + mlp1.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

import torch

# Native bf16 matrix units on x86 (AMX on Sapphire Rapids and later, AVX512-BF16 on Cooper Lake / Zen 4).
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def choose_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def choose_dtype(requested: str | None, device: str) -> tuple[str, str]:
    """(dtype name, why). bfloat16 on a GPU or where the CPU multiplies bf16 natively, float32 otherwise."""
    if requested:
        return requested, "requested with --dtype"
    if device == "cuda":
        return "bfloat16", "a GPU is available"
    native = sorted(set(BF16_FLAGS) & cpu_flags())
    if native:
        return "bfloat16", f"the CPU has native bf16 matrix units ({', '.join(native)})"
    return "float32", "the CPU has no native bf16 matrix units (no amx_bf16 / avx512_bf16): bf16 would be emulated"


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() == name:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_info(dtype: str, device: str) -> dict:
    import transformers

    flags = cpu_flags()
    mem_kib = _meminfo_kib("MemTotal")
    info = {
        "cpu_model": _cpuinfo_field("model name") or platform.processor() or "unknown",
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_flags": [f for f in REPORTED_FLAGS if f in flags],
        "memory_gib": round(mem_kib / 2**20, 1) if mem_kib else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "device": device,
        "dtype": dtype,
        "load_average_at_start": list(os.getloadavg()),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _meminfo_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------------------ resident memory


def status_mib(pid: int, field: str = "VmRSS") -> float | None:
    """A /proc/PID/status memory field (VmRSS: resident now; VmHWM: peak resident) in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


class RssSampler:
    """Samples VmRSS of some processes in a background thread; `peak` holds each one's largest sample."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.2):
        self.pids = pids
        self.interval_s = interval_s
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                rss = status_mib(pid)
                if rss is not None:
                    self.peak[name] = max(self.peak.get(name, 0.0), rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------- measured limits


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _best_seconds(fn: Callable[[], object], device: str, repeats: int = 5) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return best


def _read_seconds(dtype: torch.dtype, device: str, buffer_mib: int) -> tuple[int, float, float]:
    """(bytes, seconds of a full reduction, seconds of a matrix-vector product) over one large buffer."""
    elements = buffer_mib * 2**20 // torch.tensor([], dtype=dtype).element_size()
    # ones, not empty: untouched pages all map the zero page and would be read from cache.
    buf = torch.ones(elements, dtype=dtype, device=device)
    matrix = buf.view(-1, 1024)
    vector = torch.ones(1024, dtype=dtype, device=device)
    reduce_s = _best_seconds(lambda: buf.sum(), device)
    gemv_s = _best_seconds(lambda: torch.mv(matrix, vector), device)
    return buf.numel() * buf.element_size(), reduce_s, gemv_s


def measure_limits(dtype: torch.dtype, device: str, buffer_mib: int, matmul_sizes: tuple[int, ...]) -> dict:
    """Read bandwidth (bytes/s) and matrix throughput (FLOP/s) of this machine in `dtype`, with torch."""
    with torch.inference_mode():
        nbytes, reduce_s, gemv_s = _read_seconds(dtype, device, buffer_mib)
        matmul = {}
        for n in matmul_sizes:
            a = torch.randn(n, n, dtype=dtype, device=device)
            b = torch.randn(n, n, dtype=dtype, device=device)
            matmul[n] = 2 * n**3 / _best_seconds(lambda a=a, b=b: a @ b, device, repeats=3)
    return {
        "read_bandwidth_reduce_bytes_per_s": nbytes / reduce_s,
        "read_bandwidth_gemv_bytes_per_s": nbytes / gemv_s,
        "read_bandwidth_bytes_per_s": max(nbytes / reduce_s, nbytes / gemv_s),
        "buffer_bytes": nbytes,
        "matmul_flops_per_s_by_size": {str(n): f for n, f in matmul.items()},
        "matmul_flops_per_s": max(matmul.values()),
    }


# ----------------------------------------------------------------------------------------------------- floors


def vision_flops_per_tile(spec) -> float:
    """Multiply-adds x 2 of one tile through InternViT (patch embedding, every layer's projections, attention and
    MLP), pixel shuffle (free) and mlp1; norms, activations and softmax are left out (a few per cent)."""
    v = spec.vision
    patches = (spec.image_size // v.patch_size) ** 2
    n = patches + 1  # the class token
    d, ffn = v.hidden_size, v.intermediate_size
    patch_embed = 2 * patches * (3 * v.patch_size**2) * d
    per_layer = (2 * n * d * 3 * d  # qkv
                 + 2 * 2 * n * n * d  # q k^T and attention x v
                 + 2 * n * d * d  # output projection
                 + 2 * 2 * n * d * ffn)  # fc1, fc2
    tokens = spec.tokens_per_tile
    shuffled = int(d / spec.downsample_ratio**2)
    llm_hidden = spec.llm_hidden_size
    projector = 2 * tokens * (shuffled * llm_hidden + llm_hidden * llm_hidden)
    return float(patch_embed + v.num_hidden_layers * per_layer + projector)


def decode_bytes_per_step(language_model: torch.nn.Module, context_tokens: int) -> dict:
    """Bytes one single-stream decode step must read: every weight but the input embedding table (one row of it
    is read), plus the KV cache of the context."""
    embed = language_model.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in language_model.parameters())
    weights -= embed.numel() * embed.element_size()
    cfg = language_model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * context_tokens * embed.element_size()
    return {"weight_bytes": weights, "kv_bytes": kv, "total_bytes": weights + kv, "context_tokens": context_tokens}


def module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
