"""Inline embeddings: the `EmbeddingChunk` messages that follow a `Generate` call's start when the client sends the
images' rows itself instead of the server reading them from the shared cache. Each key's chunks assemble into one
tensor [rows, hidden] of the dtype its header names."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import torch
from internvl.common.v1 import common_pb2
from internvl.llm.v1 import llm_pb2

from services.contract.dtypes import DTYPE_FROM_PB, ITEMSIZE
from services.contract.errors import InvalidArgumentError
from services.runtime.embedding_store import tensor_from_bytes


async def read_inline_embeddings(messages: AsyncIterator[llm_pb2.GenerateRequest],
                                 max_bytes: int) -> dict[str, torch.Tensor]:
    """Assembles the EmbeddingChunk messages that follow `start` into one tensor per key.

    A malformed chunk fails the call only after the client has half-closed: the rest of its messages are read and
    discarded, so the client sees INVALID_ARGUMENT rather than a broken send.
    """
    assembler = _Assembler(max_bytes)
    error: InvalidArgumentError | None = None
    async for message in messages:
        if error is None:
            try:
                assembler.add(message)
            except InvalidArgumentError as exc:
                error = exc
    if error is not None:
        raise error
    return assembler.tensors()


class _Assembler:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.headers: dict[str, common_pb2.TensorHeader] = {}
        self.buffers: dict[str, bytearray] = {}
        self.total = 0

    def add(self, message: llm_pb2.GenerateRequest) -> None:
        if message.WhichOneof("message") != "embedding":
            raise InvalidArgumentError("only `embedding` messages may follow `start`")
        key, chunk = message.embedding.key, message.embedding.chunk
        if not key:
            raise InvalidArgumentError("an embedding chunk has no key")
        if key not in self.buffers:
            if not chunk.HasField("header") or chunk.offset != 0:
                raise InvalidArgumentError(f"the first chunk of {key} must carry the header, at offset 0")
            header = chunk.header
            if header.dtype not in DTYPE_FROM_PB or len(header.shape) != 2 or any(d < 0 for d in header.shape):
                raise InvalidArgumentError(f"embeddings of {key} must be a 2-D bfloat16, float16 or float32 tensor")
            nbytes = math.prod(header.shape) * ITEMSIZE[DTYPE_FROM_PB[header.dtype]]
            if header.total_bytes != nbytes:
                raise InvalidArgumentError(f"header of {key}: total_bytes {header.total_bytes} != {nbytes}")
            self.total += nbytes
            if self.total > self.max_bytes:
                raise InvalidArgumentError(f"inline embeddings exceed {self.max_bytes} bytes, more than the "
                                           "context holds")
            self.headers[key], self.buffers[key] = header, bytearray()
        elif chunk.HasField("header"):
            raise InvalidArgumentError(f"only the first chunk of {key} may carry a header")
        buffer = self.buffers[key]
        if chunk.offset != len(buffer):
            raise InvalidArgumentError(f"chunk of {key} at offset {chunk.offset}, expected {len(buffer)}")
        if len(buffer) + len(chunk.data) > self.headers[key].total_bytes:
            raise InvalidArgumentError(f"chunks of {key} run past total_bytes {self.headers[key].total_bytes}")
        buffer += chunk.data

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, header in self.headers.items():
            data = self.buffers.pop(key)
            if len(data) != header.total_bytes:
                raise InvalidArgumentError(f"embeddings of {key} are incomplete: {len(data)} of "
                                           f"{header.total_bytes} bytes")
            out[key] = tensor_from_bytes(DTYPE_FROM_PB[header.dtype], list(header.shape), data)
        return out
