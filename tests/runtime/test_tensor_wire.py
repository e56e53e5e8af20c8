"""Chunking a tensor's bytes for the wire: offsets, sizes, the header on the first chunk only."""

from __future__ import annotations

import numpy as np
import pytest
from internvl.common.v1 import common_pb2

from services.runtime.tensor_wire import tensor_chunks


@pytest.mark.parametrize(("nbytes", "chunk_bytes", "sizes"), [
    (10, 4, [4, 4, 2]),
    (8, 4, [4, 4]),
    (3, 4, [3]),
    (0, 4, [0]),  # an empty tensor still sends its header
])
def test_chunks_cover_the_bytes_once_in_order(nbytes, chunk_bytes, sizes):
    data = bytes(range(nbytes))
    chunks = list(tensor_chunks(common_pb2.DTYPE_FLOAT32, [nbytes], data, chunk_bytes))
    assert [len(c.data) for c in chunks] == sizes
    assert [c.offset for c in chunks] == [sum(sizes[:i]) for i in range(len(sizes))]
    assert b"".join(c.data for c in chunks) == data
    assert [c.HasField("header") for c in chunks] == [True] + [False] * (len(chunks) - 1)
    header = chunks[0].header
    assert (header.dtype, list(header.shape), header.total_bytes) == (common_pb2.DTYPE_FLOAT32, [nbytes], nbytes)


def test_a_multidimensional_memoryview_counts_bytes_not_rows():
    """The vision cache hands out views into Redis values; the size must be the byte count, whatever the view's shape."""
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    chunks = list(tensor_chunks(common_pb2.DTYPE_FLOAT32, array.shape, memoryview(array), 20))
    assert chunks[0].header.total_bytes == array.nbytes == 48
    assert b"".join(c.data for c in chunks) == array.tobytes()
