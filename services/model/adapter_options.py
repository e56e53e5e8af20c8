"""The LoRA flags of the LLM and vision services and of `up`: `--lora NAME=DIR`, `--max-loras`, `--max-lora-rank`.

Free of torch, so `up` parses them without loading it; `services.model.adapters.read_adapters` reads what they name.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple


class LoraFlag(NamedTuple):
    """One `--lora NAME=DIR`; written back as `NAME=DIR` (what `up` passes on)."""

    name: str
    directory: Path

    def __str__(self) -> str:
        return f"{self.name}={self.directory}"


def parse_lora_flag(value: str) -> LoraFlag:
    """`NAME=DIR` of `--lora` -> (name, directory); the name is a model id, so it is plain."""
    name, sep, directory = value.partition("=")
    if not sep or not name or not directory:
        raise argparse.ArgumentTypeError(f"expects NAME=DIR, got {value!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:/-]*", name):
        raise argparse.ArgumentTypeError(f"name {name!r}: use letters, digits and . _ : / - (it is the model id "
                                         "clients send)")
    return LoraFlag(name, Path(directory))


def _lora_pairs(flags: list[LoraFlag], environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple((name, str(directory)) for name, directory in flags)


DEFAULT_MAX_LORAS = 8
DEFAULT_MAX_LORA_RANK = 64


@dataclass(frozen=True)
class AdapterOptions:
    """The LoRA flags the LLM and vision services share (both pools must load the same adapters).

    Each field is a flag (`services.runtime.flags`; the metadata is spelled out here because the model code does not
    import the runtime).
    """

    # (name, directory) of each --lora, in order
    loras: tuple[tuple[str, str], ...] = field(default=(), metadata={
        "option": "--lora", "action": "append", "type": parse_lora_flag, "metavar": "NAME=DIR", "convert": _lora_pairs,
        "help": "serve the LoRA adapter in DIR (PEFT / ms-swift layout) as model id NAME; repeatable"})
    max_loras: int = field(default=DEFAULT_MAX_LORAS, metadata={
        "help": "adapters this server may hold, all resident (default %(default)s)"})
    max_lora_rank: int = field(default=DEFAULT_MAX_LORA_RANK, metadata={
        "help": "largest LoRA rank accepted (default %(default)s)"})

    def problems(self) -> list[str]:
        """What makes these flags unusable, each naming its flag."""
        names = [name for name, _ in self.loras]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        return [message for ok, message in (
            (self.max_loras >= 1, f"--max-loras must be >= 1, got {self.max_loras}"),
            (self.max_lora_rank >= 1, f"--max-lora-rank must be >= 1, got {self.max_lora_rank}"),
            (len(self.loras) <= self.max_loras,
             f"--lora given {len(self.loras)} times but --max-loras is {self.max_loras}; raise it to serve them all"),
            (not duplicated, f"--lora names must be unique, {', '.join(duplicated)} repeats"),
        ) if not ok]
