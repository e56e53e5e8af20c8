"""`internvl-serve`: one entry point for the servers and the tools.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; modules are imported
only when their subcommand runs, so `internvl-serve make-tiny` does not import gRPC and a server does not import
the benchmark.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from services.contract.errors import InternVLError
from services.runtime.logs import LOG_FORMATS, configure_logging

SUBCOMMANDS = {
    "make-tiny": ("tools.make_tiny", "write a random checkpoint in the original OpenGVLab format"),
    "merge-lora": ("tools.merge_lora",
                   "merge a LoRA adapter into its base: a full checkpoint in the original format"),
    "demo": ("tools.demo", "single-process chat with a checkpoint (the reference path)"),
    "vision": ("services.vision.server", "run the vision encoder gRPC service"),
    "llm": ("services.llm.server", "run the language model gRPC service"),
    "gateway": ("gateway.server", "run the public gateway (gRPC and OpenAI-compatible HTTP)"),
    "up": ("tools.up", "run redis, vision, llm and gateway locally as separate processes until Ctrl-C"),
    "bench": ("bench.main", "benchmark the stack against transformers' InternVL path on the same weights"),
    "bench-lora": ("bench.lora",
                   "benchmark LoRA adapters batched with the base: decode step and time to first token"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="internvl-serve", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="Python logging level (default INFO)")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                        help="stderr log lines: text (default) or json, one object per line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    # Only the chosen subcommand's module is imported; the others are listed by name.
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format, service=args.command)
    try:
        return int(args.run(args) or 0)
    except InternVLError as exc:
        # Operator-facing errors (bad checkpoint, missing file) are one line, not a traceback.
        print(f"internvl-serve {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
