"""Many LoRA adapters applied in one forward, each row of the batch with its own (Punica's BGMV, in torch).

`AdapterSlots.install` replaces every linear layer that some adapter targets by a `BatchedLoRALinear` holding all
adapters' A and B for that layer stacked in slots (slot 0 is the base: zeros). Before a forward the caller says which
slot each row uses (`with slots.rows([...])`); the layer gathers each row's A and B and adds
`scale * B_row (A_row x_row)` to the base output with two batched matmuls, so requests for different adapters and for
the base share the step. A forward whose rows are all on the base skips the LoRA terms entirely: its result is the
base model's, bit for bit.

Ranks differ between adapters; each layer's stack is padded with zeros to the largest rank among the adapters that
target it (the zero columns add exact zeros). The scale is folded into B when the stack is built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


class _Rows:
    """The slot of each row of the forward in progress ([rows] on the model's device), or None: all on the base."""

    index: torch.Tensor | None = None


class BatchedLoRALinear(nn.Module):
    """A linear layer plus a per-row LoRA term.

    a: [slots, rank, in]; b: [slots, out, rank] (scale folded in). The input is [rows, ..., in] with row i using slot
    `rows.index[i]`.
    """

    def __init__(self, base: nn.Linear, rows: _Rows, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.base = base
        self.rows = rows
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
        index = self.rows.index
        if index is None:
            return y
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # [rows, positions, in]
        low = torch.bmm(flat, self.a[index].transpose(1, 2))  # [rows, positions, rank]
        return y + torch.bmm(low, self.b[index].transpose(1, 2)).reshape(y.shape)


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
        slots = len(self.names) + 1
        for path in paths:
            base = model.get_submodule(path)
            if not isinstance(base, nn.Linear):
                raise TypeError(f"{path} is a {type(base).__name__}, not a linear layer")
            rank = max(adapter[path][0].shape[0] for adapter in weights if path in adapter)
            param = base.weight
            a = torch.zeros(slots, rank, base.in_features, dtype=param.dtype, device=param.device)
            b = torch.zeros(slots, base.out_features, rank, dtype=param.dtype, device=param.device)
            for i, (adapter, scale) in enumerate(zip(weights, scales, strict=True), start=1):
                if path in adapter:
                    lora_a, lora_b = adapter[path]
                    r = lora_a.shape[0]
                    a[i, :r] = lora_a.to(torch.float32)
                    b[i, :, :r] = lora_b.to(torch.float32) * scale
            layer = BatchedLoRALinear(base, self._rows, a, b)
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
            self.layers[path] = layer

    def slots_of(self, names: Sequence[str | None]) -> list[int]:
        """Row slots for adapter names (None or "" is the base)."""
        return [self.slot[name] if name else 0 for name in names]

    @contextlib.contextmanager
    def rows(self, slots: Sequence[int], device: torch.device | str) -> Iterator[None]:
        """Runs the forward inside with row i on `slots[i]`."""
        self._rows.index = torch.tensor(slots, device=device) if any(slots) else None
        try:
            yield
        finally:
            self._rows.index = None
