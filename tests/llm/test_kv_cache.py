"""The prefix cache's keys, matching and budget, and the left-padded decode batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.llm.batch import DecodeBatch, make_cache
from services.llm.kv_cache import PrefixCache, image_identity, kv_nbytes, prompt_identity

CTX = 9


def kv(length: int, fill: float = 1.0, layers: int = 2):
    return [(torch.full((2, length, 4), fill), torch.full((2, length, 4), -fill)) for _ in range(layers)]


def test_identity_names_image_slots_by_key():
    ids = [1, 2, 8, CTX, CTX, 3, 8, CTX, 3, 4]
    identity = prompt_identity(ids, ["a", "b"], CTX)
    assert identity.tolist() == [1, 2, 8, image_identity("a"), image_identity("a"), 3, 8, image_identity("b"), 3, 4]
    assert image_identity("a") < 0 and image_identity("a") != image_identity("b")
    other = prompt_identity(ids, ["a", "c"], CTX)
    assert (identity[:7] == other[:7]).all() and identity[7] != other[7]
    with pytest.raises(ValueError):
        prompt_identity(ids, ["a"], CTX)


def test_longest_prefix_wins_and_is_capped():
    cache = PrefixCache(budget_bytes=1 << 20)
    cache.insert(np.arange(10), kv(10, 1.0))
    cache.insert(np.array([0, 1, 2, 3, 4, 5, 70, 80]), kv(8, 2.0))
    assert cache.lookup(np.array([5, 6]), max_length=10) is None
    match = cache.lookup(np.arange(20), max_length=100)
    assert match.length == 10 and float(match.layers[0][0][0, 0, 0]) == 1.0
    match = cache.lookup(np.array([0, 1, 2, 3, 4, 5, 70, 99]), max_length=100)
    assert match.length == 7 and float(match.layers[0][0][0, 0, 0]) == 2.0
    assert match.layers[1][0].shape == (2, 7, 4)
    # A prompt equal to an entry still prefills its last token (it needs the logits).
    assert cache.lookup(np.arange(10), max_length=9).length == 9
    assert (cache.lookups, cache.hits) == (4, 3)


def test_budget_lru_and_dominated_entries():
    one = kv_nbytes(kv(10))
    cache = PrefixCache(budget_bytes=2 * one + 1)
    cache.insert(np.arange(10), kv(10))
    cache.insert(np.arange(100, 110), kv(10))
    cache.lookup(np.arange(5), max_length=5)  # touches the first entry
    cache.insert(np.arange(200, 210), kv(10))
    assert len(cache) == 2 and cache.nbytes == 2 * one and cache.evictions == 1
    assert cache.lookup(np.arange(100, 110), max_length=10) is None  # the least recently used went
    assert cache.lookup(np.arange(10), max_length=10).length == 10
    assert not cache.insert(np.arange(1000), kv(1000)), "larger than the whole budget"
    assert cache.nbytes <= cache.budget_bytes


def test_an_extended_entry_replaces_its_prefix():
    cache = PrefixCache(budget_bytes=1 << 20)
    cache.insert(np.arange(10), kv(10))
    cache.insert(np.arange(50, 60), kv(10))
    cache.insert(np.arange(12), kv(12))
    assert len(cache) == 2 and cache.nbytes == kv_nbytes(kv(10)) + kv_nbytes(kv(12))
    assert cache.lookup(np.arange(12), max_length=12).length == 12


def test_disabled_cache():
    cache = PrefixCache(0)
    assert not cache.insert(np.arange(3), kv(3))
    assert cache.lookup(np.arange(3), max_length=3) is None and cache.lookups == 0


@torch.inference_mode()
def test_batch_rows_join_leave_and_keep_their_kv(reference):
    model = reference("qwen2").language_model
    prompts = [torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 12, 8)]
    solo = []
    batch = DecodeBatch(model)
    for ids in prompts:
        cache = make_cache(model)
        model(input_ids=ids[None], cache=cache, use_cache=True, logits_to_keep=1)
        solo.append([(k[0].clone(), v[0].clone()) for k, v in ((layer.keys, layer.values) for layer in cache.layers)])
        batch.add(cache, len(ids))
    assert batch.width == 12 and batch.lengths == [5, 12, 8]
    for row in range(3):
        for (k, v), (k0, v0) in zip(batch.row(row), solo[row], strict=True):
            assert torch.equal(k, k0) and torch.equal(v, v0)
    batch.keep([2, 0])  # the longest leaves: the padding it needed goes too
    assert batch.width == 8 and batch.lengths == [8, 5]
    assert torch.equal(batch.row(0)[0][0], solo[2][0][0]) and torch.equal(batch.row(1)[1][1], solo[0][1][1])
    logits = batch.forward([1, 2])
    assert logits.shape == (2, model.config.vocab_size) and batch.lengths == [9, 6]
    batch.keep([])
    assert len(batch) == 0 and batch.nbytes == 0
