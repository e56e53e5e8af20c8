"""The running sequences' KV state as one left-padded batch (TGI's layout), driven through transformers' forward.

Row i holds sequence i's `lengths[i]` cached positions right-aligned in a [batch, kv_heads, width, head_dim] tensor
per layer; the columns to their left are padding. A decode step feeds one token per row with an attention mask that
hides the padding and explicit position_ids (each row's own length), so every row computes exactly what it would
alone. Rows join by concatenation (the narrower side padded on the left) and leave by selection, after which
all-padding columns on the left are trimmed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from services.llm.kv_cache import LayerKV


def make_cache(model: PreTrainedModel, layers: Sequence[LayerKV] | None = None) -> DynamicCache:
    """A DynamicCache for `model` holding `layers` ([batch, kv_heads, length, head_dim] each) without copying."""
    cache = DynamicCache(config=model.config)
    if layers:
        for layer, (keys, values) in zip(cache.layers, layers, strict=True):
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
    return cache


def cache_layers(cache: DynamicCache) -> list[LayerKV]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _pad_left(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    return F.pad(tensor, (0, 0, columns, 0)) if columns else tensor


class DecodeBatch:
    """Left-padded KV of the running sequences, in the order of `lengths`."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.device = model.device
        self.cache: DynamicCache | None = None
        self.lengths: list[int] = []

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return 0 if self.cache is None else self.cache.layers[0].keys.shape[-2]

    @property
    def nbytes(self) -> int:
        if self.cache is None:
            return 0
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values))

    def add(self, cache: DynamicCache, length: int) -> None:
        """Appends a sequence whose KV is the batch-of-one `cache` holding `length` positions."""
        if self.cache is None:
            self.cache, self.lengths = cache, [length]
            return
        old = self.width
        width = max(old, length)
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width - old), _pad_left(theirs.keys, width - length)])
            mine.values = torch.cat([_pad_left(mine.values, width - old), _pad_left(theirs.values, width - length)])
        self.lengths.append(length)

    def keep(self, rows: Sequence[int]) -> None:
        """Keeps only `rows` (in that order) and trims the padding no remaining row needs."""
        if len(rows) == len(self.lengths) and list(rows) == list(range(len(rows))):
            return
        if not rows:
            self.cache, self.lengths = None, []
            return
        index = torch.tensor(list(rows), device=self.device)
        lengths = [self.lengths[i] for i in rows]
        start = self.width - max(lengths)  # read before the first layer changes shape
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self.lengths = lengths

    def row(self, i: int) -> list[LayerKV]:
        """Row i's KV without padding, as [kv_heads, length, head_dim] tensors that own their memory."""
        start = self.width - self.lengths[i]
        return [(layer.keys[i, :, start:].clone(), layer.values[i, :, start:].clone()) for layer in self.cache.layers]

    def forward(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Feeds one token per row; returns the next-token logits [batch, vocab]."""
        width, lengths = self.width, torch.tensor(self.lengths, device=self.device)
        columns = torch.arange(width + 1, device=self.device)
        # Row i attends to its last lengths[i] cached columns and to the new token (column `width`).
        attention_mask = (columns[None, :] >= (width - lengths)[:, None]).long()
        ids = torch.tensor(list(token_ids), device=self.device)[:, None]
        out = self.model(input_ids=ids, attention_mask=attention_mask, position_ids=lengths[:, None],
                         cache=self.cache, use_cache=True, logits_to_keep=1)
        self.lengths = [n + 1 for n in self.lengths]
        return out.logits[:, -1]
