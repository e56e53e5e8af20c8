"""Many LoRA adapters applied in one forward, each row of the batch with its own.

`AdapterSlots.install` replaces every linear layer that some adapter targets by a `BatchedLoRALinear` holding all
adapters' A and B for that layer side by side: A as [adapters * rank, in] (adapter i's rows at [i * rank, (i + 1) *
rank)), B as [out, adapters * rank], the scale folded into B. Before a forward the caller says which slot each row uses
(`with slots.rows([...])`; slot 0 is the base, adapter i is slot i + 1). The layer then computes, for the columns of
the adapters present in the forward, `low = x A^T` (every row against every present adapter's A, one matmul), zeroes
each row's columns of the adapters it does not use, and adds `low B^T` (one matmul): each row gets exactly
`scale * B_row (A_row x_row)` plus exact zeros. Two dense matmuls over contiguous weights and no per-row gather of the
stacks: the rows of all adapters and of the base share the step (what Punica's SGMV kernels do on a GPU, here as plain
torch matmuls; the extra work is the other present adapters' few columns, rank / in of the base matmul each).

A forward whose rows are all on the base skips the LoRA terms entirely: its result is the base model's, bit for bit.
Ranks differ between adapters; each layer pads every adapter to the largest rank among those that target it (the zero
columns add exact zeros).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn


class _Rows:
    """The slot of each row of the forward in progress (on the host), and per layer rank the columns and mask that
    select them (made on the device once per forward, by the first layer that needs them)."""

    def __init__(self) -> None:
        self.slots = np.zeros(0, dtype=np.int64)
        # Some row of the forward uses an adapter (otherwise the layers skip the LoRA terms).
        self.adapted = False
        self._device: torch.device | str = "cpu"
        self._blocks: dict[tuple[int, torch.dtype], tuple[int, int, torch.Tensor]] = {}

    def set(self, slots: Sequence[int], device: torch.device | str) -> None:
        self.slots = np.asarray(slots, dtype=np.int64)
        self.adapted = bool(self.slots.any())
        self._device = device
        self._blocks = {}

    def clear(self) -> None:
        self.set((), "cpu")

    def block(self, rank: int, dtype: torch.dtype) -> tuple[int, int, torch.Tensor]:
        """(first column, end column, mask [rows, end - first]) of the present adapters in a layer of `rank` columns
        per adapter: row i's mask is 1 on its own adapter's columns, 0 elsewhere (all 0 for a base row)."""
        key = (rank, dtype)
        if key not in self._blocks:
            present = self.slots[self.slots > 0]
            low, high = int(present.min()), int(present.max())
            mask = np.zeros((len(self.slots), (high - low + 1) * rank), dtype=np.float32)
            for row, slot in enumerate(self.slots):
                if slot:
                    mask[row, (slot - low) * rank:(slot - low + 1) * rank] = 1.0
            self._blocks[key] = ((low - 1) * rank, high * rank,
                                 torch.from_numpy(mask).to(device=self._device, dtype=dtype))
        return self._blocks[key]


class BatchedLoRALinear(nn.Module):
    """A linear layer plus a per-row LoRA term.

    a: [adapters * rank, in]; b: [out, adapters * rank] (scale folded in). The input is [rows, ..., in], row i using
    slot `rows.slots[i]`.
    """

    def __init__(self, base: nn.Linear, rows: _Rows, a: torch.Tensor, b: torch.Tensor, rank: int):
        super().__init__()
        self.base = base
        self.rows = rows
        self.rank = rank
        self.register_buffer("a", a, persistent=False)
        self.register_buffer("b", b, persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # transformers reads the output embedding's weight (vocabulary size)
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.rows.adapted:
            return y
        start, end, mask = self.rows.block(self.rank, y.dtype)
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # [rows, positions, in]
        low = torch.matmul(flat, self.a[start:end].T) * mask[:, None, :]  # [rows, positions, columns]
        return y + torch.matmul(low, self.b[:, start:end].T).reshape(y.shape)


class AdapterSlots:
    """The adapters installed in one model, by slot: 0 is the base, adapter i of `names` is slot i + 1."""

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self.slot = {name: i + 1 for i, name in enumerate(self.names)}
        self._rows = _Rows()
        self.layers: dict[str, BatchedLoRALinear] = {}

    def install(self, model: nn.Module, weights: Sequence[dict[str, tuple[torch.Tensor, torch.Tensor]]],
                scales: Sequence[float]) -> None:
        """weights[i]: adapter i's {module path in `model`: (A [rank, in], B [out, rank])}; scales[i] its scale."""
        paths = sorted({path for adapter in weights for path in adapter})
        for path in paths:
            base = model.get_submodule(path)
            if not isinstance(base, nn.Linear):
                raise TypeError(f"{path} is a {type(base).__name__}, not a linear layer")
            rank = max(adapter[path][0].shape[0] for adapter in weights if path in adapter)
            param = base.weight
            a = torch.zeros(len(self.names) * rank, base.in_features, dtype=param.dtype, device=param.device)
            b = torch.zeros(base.out_features, len(self.names) * rank, dtype=param.dtype, device=param.device)
            for i, (adapter, scale) in enumerate(zip(weights, scales, strict=True)):
                if path in adapter:
                    lora_a, lora_b = adapter[path]
                    r = lora_a.shape[0]
                    a[i * rank:i * rank + r] = lora_a.to(torch.float32)
                    b[:, i * rank:i * rank + r] = lora_b.to(torch.float32) * scale
            layer = BatchedLoRALinear(base, self._rows, a, b, rank)
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
            self.layers[path] = layer

    def slots_of(self, names: Sequence[str | None]) -> list[int]:
        """Row slots for adapter names (None or "" is the base)."""
        return [self.slot[name] if name else 0 for name in names]

    @contextlib.contextmanager
    def rows(self, slots: Sequence[int], device: torch.device | str) -> Iterator[None]:
        """Runs the forward inside with row i on `slots[i]`."""
        self._rows.set(slots, device)
        try:
            yield
        finally:
            self._rows.clear()
