"""The grammar compile worker: a child process of the LLM service that compiles grammars, one at a time.

Run as `python -m services.llm.grammar_worker` by `services.llm.grammar_pool`, which kills it when a compile
overruns --grammar-compile-timeout-s: a thread cannot be stopped, and xgrammar's compile of a small
pathological constraint can take minutes and gigabytes (see the pool's docstring). Protocol on stdin/stdout,
every message one frame (a 4-byte big-endian length, then that many bytes of JSON; never pickle):

    parent -> child   {"vocabulary": [...], "metadata": "..."}       once, first: the TokenizerInfo to compile for
    child -> parent   {"ready": true}                                 once its first (warm-up) compile is done
    parent -> child   {"ebnf": "<a constraint's grammar text>", "kind": "<its kind, for the error>"}
    child -> parent   {"grammar": "<CompiledGrammar.serialize_json()>"} or {"error": "<kind>: <reason>"}

The child's file descriptor 1 becomes stderr, so nothing a library prints can corrupt the frames.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from typing import BinaryIO

import xgrammar

from services.contract.constraint import Constraint, ConstraintKind
from services.contract.errors import InvalidArgumentError
from services.llm.grammar import compile_ebnf, grammar_text

_LENGTH = struct.Struct(">I")
# What the child's compiler keeps of grammars it compiled (xgrammar's cache), so a schema many requests share is
# compiled once per worker.
CACHE_LIMIT_BYTES = 256 * 1024 * 1024


def encode_frame(message: dict) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return _LENGTH.pack(len(body)) + body


def decode_length(header: bytes) -> int:
    return _LENGTH.unpack(header)[0]


def _read(stream: BinaryIO) -> dict | None:
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        return None  # the parent closed our stdin: exit
    return json.loads(stream.read(decode_length(header)))


def _answer(compiler: xgrammar.GrammarCompiler, message: dict) -> dict:
    try:
        return {"grammar": compile_ebnf(compiler, message["ebnf"], message["kind"]).serialize_json()}
    except InvalidArgumentError as exc:
        return {"error": str(exc)}


def main() -> None:
    # Below the service's own threads (the engine's step, tokenisation) in the CPU scheduler's eyes.
    os.nice(10)
    frames_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print goes to stderr, not into the frames
    sys.stdout = sys.stderr
    frames_in = sys.stdin.buffer
    setup = _read(frames_in)
    if setup is None:
        return
    info = xgrammar.TokenizerInfo.from_vocab_and_metadata(setup["vocabulary"], setup["metadata"])
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=True, cache_limit_bytes=CACHE_LIMIT_BYTES)
    # The first compile prepares the vocabulary (seconds for 150k tokens): done before "ready", so that it never
    # counts against a request's budget.
    compile_ebnf(compiler, grammar_text(Constraint(ConstraintKind.CHOICE, choices=("ready",))), "choice")
    frames_out.write(encode_frame({"ready": True}))
    frames_out.flush()
    while (message := _read(frames_in)) is not None:
        frames_out.write(encode_frame(_answer(compiler, message)))
        frames_out.flush()


if __name__ == "__main__":
    main()
