"""The LoRA flags of the LLM and vision services and of `up`: `--lora NAME=DIR`, `--max-loras`, `--max-lora-rank`.

Free of torch, so `up` parses them without loading it; `services.model.adapters.read_adapters` reads what they name.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path


def parse_lora_flag(value: str) -> tuple[str, Path]:
    """`NAME=DIR` of `--lora` -> (name, directory); the name is a model id, so it is plain."""
    name, sep, directory = value.partition("=")
    if not sep or not name or not directory:
        raise argparse.ArgumentTypeError(f"expects NAME=DIR, got {value!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:/-]*", name):
        raise argparse.ArgumentTypeError(f"name {name!r}: use letters, digits and . _ : / - (it is the model id "
                                         "clients send)")
    return name, Path(directory)


DEFAULT_MAX_LORAS = 8
DEFAULT_MAX_LORA_RANK = 64


@dataclass(frozen=True)
class AdapterOptions:
    """The LoRA flags the LLM and vision services share (both pools must load the same adapters)."""

    loras: tuple[tuple[str, str], ...] = ()  # (name, directory) of each --lora, in order
    max_loras: int = DEFAULT_MAX_LORAS
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK

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

    def argv(self) -> list[str]:
        """These options as a service's flags (what `up` passes on)."""
        return [*(f for name, directory in self.loras for f in ("--lora", f"{name}={directory}")),
                "--max-loras", str(self.max_loras), "--max-lora-rank", str(self.max_lora_rank)]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AdapterOptions:
        return cls(loras=tuple((name, str(path)) for name, path in args.lora), max_loras=args.max_loras,
                   max_lora_rank=args.max_lora_rank)


def add_adapter_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lora", action="append", type=parse_lora_flag, default=[], metavar="NAME=DIR",
                        help="serve the LoRA adapter in DIR (PEFT / ms-swift layout) as model id NAME; repeatable")
    parser.add_argument("--max-loras", type=int, default=DEFAULT_MAX_LORAS,
                        help=f"adapters this server may hold, all resident (default {DEFAULT_MAX_LORAS})")
    parser.add_argument("--max-lora-rank", type=int, default=DEFAULT_MAX_LORA_RANK,
                        help=f"largest LoRA rank accepted (default {DEFAULT_MAX_LORA_RANK})")
