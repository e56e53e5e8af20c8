"""`internvl-serve demo`: one question about an image (or none) through the single-process reference path."""

from __future__ import annotations

import argparse
import time

from services.contract.dtypes import DTYPE_NAMES
from services.model.chat import GenerationParams, InternVLChat
from services.vision.preprocess import load_image


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id")
    parser.add_argument("--image", action="append", default=[], help="image file (repeat for several images)")
    parser.add_argument("--question", default="Describe the image.")
    parser.add_argument("--max-num", type=int, default=12, help="most tiles per image")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    import torch

    started = time.perf_counter()
    chat = InternVLChat.load(args.model, dtype=args.dtype, device=args.device)
    print(f"loaded {chat.checkpoint.name} (fingerprint {chat.checkpoint.fingerprint}) "
          f"in {time.perf_counter() - started:.1f}s")
    tiles = [load_image(path, max_num=args.max_num) for path in args.image]
    pixels = torch.cat(tiles) if tiles else None
    question = args.question
    if len(tiles) > 1 and "<image>" not in question:
        question = "".join(f"Image-{i + 1}: <image>\n" for i in range(len(tiles))) + question
    started = time.perf_counter()
    answer, _ = chat.chat(pixels, question, GenerationParams(max_new_tokens=args.max_new_tokens),
                          num_patches_list=[t.shape[0] for t in tiles] or None)
    print(f"tiles per image: {[t.shape[0] for t in tiles]}; answered in {time.perf_counter() - started:.1f}s")
    print(f"Q: {question}\nA: {answer}")
    return 0
