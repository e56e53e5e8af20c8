"""`internvl-serve make-tiny`: write a random checkpoint in exactly the original OpenGVLab format."""

from __future__ import annotations

import argparse

from services.model.tiny import PRESETS, make_tiny


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory to write (created if missing)")
    parser.add_argument("--llm", choices=("qwen2", "internlm2"), default="qwen2")
    parser.add_argument("--vision", choices=("300m", "6b"), default="300m",
                        help="300m: LayerNorm + qkv bias; 6b: RMSNorm + qk-norm, no qkv bias")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="tiny: a few MB of weights; small: LLM head size 32, the smallest vLLM's CPU attention runs; "
                             "1b-shape: InternVL2_5-1B's real dimensions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1, help="safetensors shards (>1 writes an index)")


def run(args: argparse.Namespace) -> int:
    out = make_tiny(args.out, llm=args.llm, vision=args.vision, preset=args.preset, seed=args.seed,
                    shards=args.shards)
    print(out)
    return 0
