"""The tensor element types the stack computes in and moves around, by the one spelling every process uses.

The name ("bfloat16", ...) is what configs, `--dtype` flags, cache headers and `ModelInfo.dtype` carry; the wire
enum is `internvl.common.v1.DType`. Torch's own dtypes are mapped in `services.model.modules`, beside the code
that computes in them, so this module stays importable without torch.
"""

from __future__ import annotations

from internvl.common.v1 import common_pb2

# Bytes per element, by name; also the list of names that exist, in the order `--dtype` offers them.
ITEMSIZE: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPE_NAMES: tuple[str, ...] = tuple(ITEMSIZE)

DTYPE_TO_PB: dict[str, int] = {
    "bfloat16": common_pb2.DTYPE_BFLOAT16,
    "float16": common_pb2.DTYPE_FLOAT16,
    "float32": common_pb2.DTYPE_FLOAT32,
}
DTYPE_FROM_PB: dict[int, str] = {value: name for name, value in DTYPE_TO_PB.items()}


def dtype_name(dtype: object) -> str:
    """`torch.bfloat16` -> "bfloat16" (works on the torch dtype object without importing torch)."""
    return str(dtype).removeprefix("torch.")
