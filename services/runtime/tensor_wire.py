"""A tensor's bytes on the wire: `TensorChunk`s, the first carrying the `TensorHeader` (dtype, shape, total size).

One definition for every stream that carries embeddings: the vision service's FetchEmbeddings and the inline
embeddings a client sends to the LLM service's Generate.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from internvl.common.v1 import common_pb2


def tensor_chunks(dtype: int, shape: Sequence[int], data: bytes | memoryview,
                  chunk_bytes: int) -> Iterator[common_pb2.TensorChunk]:
    """`data` (row-major, `dtype` a `common_pb2.DType`) as chunks of at most `chunk_bytes`, at increasing offsets.

    An empty tensor is still one chunk, so a receiver always sees the header.
    """
    view = memoryview(data).cast("B")
    header = common_pb2.TensorHeader(dtype=dtype, shape=list(shape), total_bytes=len(view))
    for offset in range(0, max(len(view), 1), chunk_bytes):
        chunk = common_pb2.TensorChunk(offset=offset, data=bytes(view[offset:offset + chunk_bytes]))
        if offset == 0:
            chunk.header.CopyFrom(header)
        yield chunk
