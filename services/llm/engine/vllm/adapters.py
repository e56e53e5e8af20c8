"""LoRA adapters for vLLM: the language part of each adapter the service serves, in a private copy vLLM reads, and
vLLM's LoRA sizes for them.

vLLM loads an adapter from a directory in PEFT's format. It is given a copy, written by the engine into a private
temporary directory (never into the user's adapter directory), that holds only the adapter's language part: the
vision tower's and projector's LoRA is applied by the vision service, whose embeddings this engine receives (vLLM
never runs the tower here), and vLLM must neither load nor refuse it. The copy is the adapter as read and checked by
services.model.adapters (the same A and B, rank, alpha and rsLoRA, so the same digest's computation), with modules
named as vLLM's model names them (`VLLM_MODULE_NAMES`; services.llm.engine.vllm.lora_heads).

An adapter without a language part (it adapts only the vision side) computes with the base here: it gets no copy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from services.contract.errors import InvalidArgumentError
from services.model.adapters import CONFIG_FILE, LANGUAGE_PREFIXES, WEIGHTS_FILE, Adapter

# Our module names (the checkpoint's) that vLLM's model names otherwise: InternLM2's LM head.
VLLM_MODULE_NAMES = {"language_model.output": "language_model.lm_head"}
# The ranks vLLM's LoRA configuration takes (its `max_lora_rank` is one of these).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class AdapterCopy:
    """Where an adapter's language part was written, and its id for vLLM (1, 2, ...; 0 means no adapter there)."""

    name: str
    lora_id: int
    path: Path


def check_adapters(adapters: Sequence[Adapter]) -> None:
    """Refuses an adapter vLLM cannot hold, naming it (at start-up, before any process starts)."""
    for adapter in adapters:
        if adapter.rank > VLLM_RANKS[-1]:
            raise InvalidArgumentError(f"--lora {adapter.name}: rank {adapter.rank} is over the vLLM engine's largest "
                                       f"LoRA rank ({VLLM_RANKS[-1]})")


def lora_rank(adapters: Sequence[Adapter]) -> int:
    """vLLM's `max_lora_rank` for `adapters`: the smallest rank it takes that holds the largest adapter's (vLLM pads
    every adapter to it, in memory it allocates for `max_loras` adapters in every adapted layer)."""
    largest = max((adapter.rank for adapter in adapters), default=1)
    return next(rank for rank in VLLM_RANKS if rank >= largest)


def write_language_copies(adapters: Sequence[Adapter], directory: Path) -> dict[str, AdapterCopy]:
    """Writes each adapter's language part under `directory` (one folder per adapter); {name: its copy} for those
    with a language part."""
    copies: dict[str, AdapterCopy] = {}
    for adapter in adapters:
        modules = {VLLM_MODULE_NAMES.get(module, module): ab
                   for module, ab in adapter.part(LANGUAGE_PREFIXES).items()}
        if not modules:
            continue
        folder = directory / f"{len(copies) + 1}"
        folder.mkdir(parents=True)
        weights = {}
        for module, (a, b) in modules.items():
            weights[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
            weights[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
        save_file(weights, folder / WEIGHTS_FILE, metadata={"format": "pt"})
        config = {"peft_type": "LORA", "r": adapter.rank, "lora_alpha": adapter.alpha, "use_rslora": adapter.use_rslora,
                  "bias": "none", "target_modules": sorted(modules)}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        copies[adapter.name] = AdapterCopy(adapter.name, len(copies) + 1, folder)
    return copies
