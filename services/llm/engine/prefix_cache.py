"""The prefix KV cache: the KV state of finished turns, reused by the next turn of the same conversation.

An entry is keyed by the *identity* of every position it covers: the token id, except that an `<IMG_CONTEXT>` slot
is identified by the image whose embedding filled it (a negative 63-bit hash of its cache key). Two positions with
equal identities, preceded by equal identities, hold equal KV; so the longest common identity prefix of a new prompt
and an entry is KV the new prompt can reuse as is. Keys are content addresses, so equal keys mean equal embeddings
(and equal tile counts, which the service checks against the rows).

An entry belongs to one model: the base or one LoRA adapter (`adapter`, its name). A prefix never crosses models, since
the same tokens have other KV under another adapter. An entry also belongs to one cache salt (`salt`, the request's
`cache_salt`; "" unsalted): a prompt reuses only KV computed under its own salt, so callers of different salts (the
gateway's tenants) cannot learn from a hit, i.e. from a short time to first token, what another sent. The salt scopes
the entry exactly as it would head a hash chain of blocks: equal identities under different salts never match.

Entries live in LRU order within a byte budget; an entry that is a prefix of a newer one is dropped (the newer covers
it). Lookup is a linear scan with a vectorised comparison per entry, which is cheap next to a prefill for the few
hundred entries a budget holds.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# One layer's (keys, values), each [kv_heads, length, head_dim] for a single sequence.
LayerKV = tuple[torch.Tensor, torch.Tensor]


def image_identity(key: str) -> int:
    """A negative int64 standing for every slot of one image (token ids are never negative)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return -(int.from_bytes(digest, "big") >> 1) - 1


def prompt_identity(token_ids: Sequence[int], image_keys: Sequence[str], img_context_id: int) -> np.ndarray:
    """Identities of a prompt's positions: its token ids, each image's slots replaced by that image's identity.

    Slots come in one contiguous run per image, in the order of `image_keys`.
    """
    ids = np.asarray(token_ids, dtype=np.int64)
    slots = ids == img_context_id
    if not slots.any():
        return ids
    starts = np.flatnonzero(slots & ~np.concatenate(([False], slots[:-1])))
    ends = np.flatnonzero(slots & ~np.concatenate((slots[1:], [False]))) + 1
    if len(starts) != len(image_keys):
        raise ValueError(f"{len(starts)} image slot runs but {len(image_keys)} image keys")
    out = ids.copy()
    for start, end, key in zip(starts, ends, image_keys, strict=True):
        out[start:end] = image_identity(key)
    return out


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    different = np.flatnonzero(a[:n] != b[:n])
    return int(different[0]) if len(different) else n


def kv_nbytes(layers: Sequence[LayerKV]) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)


@dataclass
class Entry:
    identity: np.ndarray
    layers: list[LayerKV]
    nbytes: int
    adapter: str
    salt: str = ""

    def scoped(self, adapter: str, salt: str) -> bool:
        """Whether this entry's KV may serve a prompt of `adapter` and `salt`."""
        return self.adapter == adapter and self.salt == salt


@dataclass(frozen=True)
class Match:
    """`length` leading positions of a prompt whose KV `layers` (sliced to that length) can be reused."""

    length: int
    layers: list[LayerKV]


class PrefixCache:
    """LRU of finished sequences' KV within `budget_bytes` (0: disabled). Safe to call from any thread."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._next_id = 0
        self._lock = threading.Lock()
        self.nbytes = 0
        # Counters for metrics and tests; they only grow.
        self.lookups = 0
        self.hits = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, identity: np.ndarray, max_length: int, adapter: str = "", salt: str = "") -> Match | None:
        """The longest reusable prefix of `identity` computed by `adapter` ("" the base) under `salt` ("" unsalted),
        at most `max_length` positions; None when nothing matches."""
        if not self.enabled:
            return None
        with self._lock:
            self.lookups += 1
            best_id, best = None, 0
            for entry_id, entry in self._entries.items():
                if not entry.scoped(adapter, salt):
                    continue
                length = min(common_prefix(identity, entry.identity), max_length)
                if length > best:
                    best_id, best = entry_id, length
            if best_id is None:
                return None
            self.hits += 1
            self._entries.move_to_end(best_id)
            entry = self._entries[best_id]
        return Match(best, [(k[:, :best], v[:, :best]) for k, v in entry.layers])

    def insert(self, identity: np.ndarray, layers: list[LayerKV], adapter: str = "", salt: str = "") -> bool:
        """Keeps `layers` (owned by the cache from now on) under `identity`, `adapter` ("" the base) and `salt` (""
        unsalted); False if it cannot fit the budget."""
        nbytes = kv_nbytes(layers)
        if not self.enabled or nbytes > self.budget_bytes or len(identity) == 0:
            return False
        with self._lock:
            for entry_id in [i for i, e in self._entries.items()
                             if e.scoped(adapter, salt) and len(e.identity) <= len(identity)
                             and common_prefix(e.identity, identity) == len(e.identity)]:
                self._drop(entry_id)
            while self._entries and self.nbytes + nbytes > self.budget_bytes:
                self._drop(next(iter(self._entries)))
                self.evictions += 1
            self._entries[self._next_id] = Entry(identity, layers, nbytes, adapter, salt)
            self._next_id += 1
            self.nbytes += nbytes
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def _drop(self, entry_id: int) -> None:
        self.nbytes -= self._entries.pop(entry_id).nbytes
