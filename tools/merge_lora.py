"""`internvl-serve merge-lora`: a LoRA adapter merged into its base, written as a full checkpoint in the original
OpenGVLab format (what ms-swift's `swift export --merge_lora true` produces).

The output has the base's weight names, stored dtypes and sharding (same shard files, same index with `total_size`
recomputed) and copies of every other file of the base directory, so anything that loads the base loads it, with no
adapter at run time. Each adapted module's weight becomes `W + scale * (B @ A)`, computed in float32 and cast back to
W's dtype; every other tensor is copied unchanged. Shards are read and written one at a time, so a 78B model never
has to fit in memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from services.contract.errors import CheckpointError
from services.model.adapters import Adapter, read_adapter
from services.model.checkpoint import INDEX_FILE, Checkpoint, open_checkpoint, read_json

log = logging.getLogger(__name__)

# Top-level entries of a base directory that are bookkeeping of a download or a clone, not part of the model: a
# copy would claim files it does not describe (huggingface_hub's `--local-dir` metadata, git objects).
_NOT_COPIED = {".cache", ".git"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="base checkpoint: directory (original OpenGVLab format), hub id or modelscope:ORG/NAME")
    parser.add_argument("--adapter", required=True, type=Path,
                        help="LoRA adapter directory (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--out", required=True, type=Path, help="directory to write; must not exist or be empty")
    # Serving bounds the rank for memory and speed; a merge has no per-rank cost, so the bound is only a sanity check.
    parser.add_argument("--max-lora-rank", type=int, default=1024, help="largest adapter rank accepted (default 1024)")


def run(args: argparse.Namespace) -> int:
    out = merge_lora(args.model, args.adapter, args.out, max_rank=args.max_lora_rank)
    print(out)
    return 0


def merge_lora(model: str, adapter_dir: str | os.PathLike, out: str | os.PathLike, *, max_rank: int = 1024) -> Path:
    """Writes base `model` with the adapter in `adapter_dir` merged into `out` and returns `out` (resolved).

    Raises CheckpointError, before writing anything, for a bad base or adapter, or an `out` that is not empty or lies
    in the base directory. The checkpoint is built in a hidden sibling of `out` and renamed into place at the end, so
    a failure leaves no half-written checkpoint behind.
    """
    base = open_checkpoint(model)
    out = Path(out).expanduser().resolve()
    _check_out(out, base.path)
    adapter = read_adapter(Path(adapter_dir).name, Path(adapter_dir), base, max_rank=max_rank)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Created with mkdir rather than tempfile.mkdtemp, whose 0700 mode the renamed checkpoint would keep.
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        _write(base, adapter, staging)
        if out.exists():
            out.rmdir()  # empty (checked above); rename(2) replaces an empty directory, but not on every platform
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("merged %d modules of %s into %s", len(adapter.modules), adapter.path, out)
    return out


def _check_out(out: Path, base: Path) -> None:
    """Refuses an `out` that would overwrite something: the base itself, a place inside it, or a non-empty path."""
    if out == base or base in out.parents:
        raise CheckpointError(f"--out {out} is the base checkpoint directory or inside it; choose another directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"--out {out} exists and is not empty; choose a new or empty directory")


def _write(base: Checkpoint, adapter: Adapter, out: Path) -> None:
    """Every shard merged and rewritten under its own name, the index updated, every other file copied."""
    shards = sorted(set(base.weight_map.values()))
    merged: set[str] = set()
    total_size = 0
    for shard in shards:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(base.path / shard, framework="pt") as reader:
            for key in reader.keys():  # noqa: SIM118 - safe_open is not iterable
                tensor = reader.get_tensor(key)
                module = key.removesuffix(".weight")
                if key.endswith(".weight") and module in adapter.modules:
                    tensor = _merged(tensor, *adapter.modules[module], adapter.scale)
                    merged.add(module)
                tensors[key] = tensor
                total_size += tensor.numel() * tensor.element_size()
        save_file(tensors, out / shard, metadata={"format": "pt"})
        log.info("wrote %s (%d tensors)", shard, len(tensors))
        del tensors  # one shard in memory at a time
    missed = sorted(set(adapter.modules) - merged)
    if missed:  # read_adapter checked every module against the base's headers; this guards against a broken shard
        raise CheckpointError(f"{base.path}: no shard holds {missed[0]}.weight, which the adapter adapts")
    if (base.path / INDEX_FILE).is_file():
        # Keep the base's index as is (weight_map order, any other fields); only the byte count is recomputed.
        index = read_json(base.path / INDEX_FILE)
        index["metadata"] = {**(index.get("metadata") or {}), "total_size": total_size}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    _copy_other_files(base.path, out, skip={*shards, INDEX_FILE})


def _merged(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * (B @ A) in float32, cast to W's stored dtype (a bf16 base stays bf16, like PEFT's merge)."""
    delta = b.to(torch.float32) @ a.to(torch.float32)
    return (weight.to(torch.float32) + scale * delta).to(weight.dtype).contiguous()


def _copy_other_files(base: Path, out: Path, skip: set[str]) -> None:
    """Copies every file of `base` but `skip` (relative paths) into `out`, keeping subdirectories.

    Hub snapshots are symlinks into a blob store; copying follows them, so `out` holds real files.
    """
    for source in sorted(base.rglob("*")):
        relative = source.relative_to(base)
        if relative.parts[0] in _NOT_COPIED or relative.as_posix() in skip or not source.is_file():
            continue
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
