"""The KV state of the transformers engine's forwards, in preallocated buffers driven through transformers' forward.

`KVBatch` holds the running sequences for decode steps: per layer one [rows, kv_heads, columns, head_dim] buffer in
which every row's cached positions are right-aligned at one shared end column (TGI's left-padded layout). A decode
step writes each row's new position into column `end` in place, so a step copies no KV; only a join (the buffer is
rebuilt with room for the new rows, one layer at a time so the transient copy is one layer's) and running out of
columns (a rebuild every `COLUMN_SLACK` steps) copy. A leaving row is overwritten by the last row. Row i attends to its
own `lengths[i]` columns through the attention mask and sees its own positions through `position_ids`, so each row
computes what it would alone.

`prefill_forward` runs several prompts' next chunks in one forward: each row is [left padding | its cached past |
its chunk | right padding]; every query has at least one real key before it (its own past or chunk), so no softmax
row is fully masked, and padding holds zeros, never NaN (a masked NaN would still poison `P @ V`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from services.llm.engine.prefix_cache import LayerKV

# Columns allocated beyond the longest row at a rebuild: decode steps between two rebuilds.
COLUMN_SLACK = 64


class _BufferLayer(DynamicLayer):
    """One layer's KV during a forward: `update` writes the new positions at column `end` of the buffers in place and
    returns the columns [start, end) as views."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, start: int, end: int):
        super().__init__()
        self.buffer_keys, self.buffer_values = keys, values
        self.start, self.end = start, end
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        new = key_states.shape[-2]
        self.buffer_keys[:, :, self.end:self.end + new] = key_states
        self.buffer_values[:, :, self.end:self.end + new] = value_states
        self.end += new
        return (self.buffer_keys[:, :, self.start:self.end], self.buffer_values[:, :, self.start:self.end])

    def get_seq_length(self) -> int:
        return self.end - self.start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


def _cache(model: PreTrainedModel, layers: list[_BufferLayer]) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    cache.layers = layers
    return cache


@dataclass(frozen=True)
class KVShape:
    """What one position's KV looks like in `model`."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, model: PreTrainedModel) -> KVShape:
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, config.num_key_value_heads, head_dim, model.dtype, model.device)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype.itemsize

    def zeros(self, rows: int, columns: int) -> torch.Tensor:
        return torch.zeros(rows, self.kv_heads, columns, self.head_dim, dtype=self.dtype, device=self.device)


class KVBatch:
    """The running sequences' KV, row i holding `lengths[i]` positions ending at column `end`."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.shape = KVShape.of(model)
        self.keys: list[torch.Tensor] = []  # per layer [row capacity, kv_heads, columns, head_dim]
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []
        self.end = 0

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return max(self.lengths, default=0)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def add(self, rows: Sequence[list[LayerKV]]) -> None:
        """Appends sequences given as their KV (per layer ([kv_heads, length, head_dim],) * 2), in order."""
        if rows:
            self._rebuild(rows)

    def remove(self, row: int) -> None:
        """Drops `row`; the last row takes its place (so row indices of the others stay, but the last's is `row`)."""
        last = len(self.lengths) - 1
        if row != last:
            start = self.end - self.width
            for buffer in (*self.keys, *self.values):
                buffer[row, :, start:self.end] = buffer[last, :, start:self.end]
            self.lengths[row] = self.lengths[last]
        self.lengths.pop()
        if not self.lengths:
            self.keys, self.values, self.end = [], [], 0

    def row(self, i: int) -> list[LayerKV]:
        """Row i's KV without padding, as [kv_heads, length, head_dim] tensors that own their memory."""
        start = self.end - self.lengths[i]
        return [(k[i, :, start:self.end].clone(), v[i, :, start:self.end].clone())
                for k, v in zip(self.keys, self.values, strict=True)]

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Feeds one token per row (`token_ids` [rows]); returns the next-token logits [rows, vocab]."""
        if self.end >= self.keys[0].shape[2]:
            self._rebuild(())
        rows, width = len(self.lengths), self.width
        lengths = torch.tensor(self.lengths, device=self.shape.device)
        attention_mask = None
        if min(self.lengths) != width:
            # Row i attends to its last lengths[i] cached columns and to the new token (column `width`).
            columns = torch.arange(width + 1, device=self.shape.device)
            attention_mask = (columns[None, :] >= (width - lengths)[:, None]).long()
        start = self.end - width
        layers = [_BufferLayer(k[:rows], v[:rows], start, self.end) for k, v in zip(self.keys, self.values,
                                                                                     strict=True)]
        out = self.model(input_ids=token_ids[:, None], attention_mask=attention_mask, position_ids=lengths[:, None],
                         past_key_values=_cache(self.model, layers), use_cache=True, logits_to_keep=1)
        self.end += 1
        self.lengths = [n + 1 for n in self.lengths]
        return out.logits[:, -1]

    def _rebuild(self, new_rows: Sequence[list[LayerKV]]) -> None:
        """New buffers holding the current rows and `new_rows`, right-aligned at the widest, with COLUMN_SLACK free
        columns; one layer at a time, so only one layer is ever held twice."""
        old_rows, old_width, old_end = len(self.lengths), self.width, self.end
        lengths = self.lengths + [layers[0][0].shape[1] for layers in new_rows]
        width = max(lengths)
        columns = width + COLUMN_SLACK
        for layer in range(self.shape.layers):
            for buffers, side in ((self.keys, 0), (self.values, 1)):
                fresh = self.shape.zeros(len(lengths), columns)
                if old_rows:
                    fresh[:old_rows, :, width - old_width:width] = buffers[layer][:old_rows, :, old_end - old_width:
                                                                                  old_end]
                for i, layers in enumerate(new_rows, start=old_rows):
                    fresh[i, :, width - lengths[i]:width] = layers[layer][side]
                if layer < len(buffers):
                    buffers[layer] = fresh
                else:
                    buffers.append(fresh)
        self.lengths, self.end = lengths, width


@dataclass
class PrefillRow:
    """One prompt's next chunk: its cached past (per layer ([kv_heads, past, head_dim],) * 2, or None) and the chunk's
    input embeddings [chunk, hidden], whose first position is `past` tokens into the prompt."""

    past: list[LayerKV] | None
    past_length: int
    embeds: torch.Tensor


def prefill_forward(model: PreTrainedModel, rows: Sequence[PrefillRow]) -> tuple[torch.Tensor, list[list[LayerKV]]]:
    """Runs every row's chunk in one forward.

    Returns the last hidden state of each row's last chunk position [rows, hidden] and each row's KV after the chunk
    (past + chunk positions; views into one shared buffer, to be copied by whoever keeps them).
    """
    shape = KVShape.of(model)
    past = max(r.past_length for r in rows)
    chunk = max(r.embeds.shape[0] for r in rows)
    keys = [shape.zeros(len(rows), past + chunk) for _ in range(shape.layers)]
    values = [shape.zeros(len(rows), past + chunk) for _ in range(shape.layers)]
    for i, r in enumerate(rows):
        if r.past is not None:
            for layer, (k, v) in enumerate(r.past):
                keys[layer][i, :, past - r.past_length:past] = k
                values[layer][i, :, past - r.past_length:past] = v
    embeds = torch.zeros(len(rows), chunk, rows[0].embeds.shape[1], dtype=shape.dtype, device=shape.device)
    positions = torch.empty(len(rows), chunk, dtype=torch.long, device=shape.device)
    mask = torch.zeros(len(rows), past + chunk, dtype=torch.long, device=shape.device)
    padded = any(r.past_length != past or r.embeds.shape[0] != chunk for r in rows)
    for i, r in enumerate(rows):
        n = r.embeds.shape[0]
        embeds[i, :n] = r.embeds
        positions[i] = torch.arange(r.past_length, r.past_length + chunk, device=shape.device)
        mask[i, past - r.past_length:past + n] = 1
    layers = [_BufferLayer(k, v, 0, past) for k, v in zip(keys, values, strict=True)]
    out = model.model(inputs_embeds=embeds, attention_mask=mask if padded else None,
                      position_ids=positions, past_key_values=_cache(model, layers), use_cache=True)
    last = torch.tensor([r.embeds.shape[0] - 1 for r in rows], device=shape.device)
    hidden = out.last_hidden_state[torch.arange(len(rows), device=shape.device), last]
    kv = [[(k[i, :, past - r.past_length:past + r.embeds.shape[0]], v[i, :, past - r.past_length:past
                                                                       + r.embeds.shape[0]])
           for k, v in zip(keys, values, strict=True)] for i, r in enumerate(rows)]
    return hidden, kv
