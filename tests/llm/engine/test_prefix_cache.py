"""The prefix cache's keys, matching and budget; the decode batch and the batched prefill against transformers' own
forward with its DynamicCache, one sequence at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from services.llm.engine import batch as batch_module
from services.llm.engine.batch import KVBatch, PrefillRow, prefill_forward
from services.llm.engine.prefix_cache import PrefixCache, image_identity, kv_nbytes, prompt_identity

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


def test_a_salt_scopes_entries_as_the_adapter_does():
    cache = PrefixCache(budget_bytes=1 << 20)
    cache.insert(np.arange(10), kv(10, 1.0), salt="alpha")
    assert cache.lookup(np.arange(10), max_length=9, salt="beta") is None
    assert cache.lookup(np.arange(10), max_length=9) is None  # the unsalted scope is another too
    assert cache.lookup(np.arange(10), max_length=9, adapter="lora", salt="alpha") is None
    assert cache.lookup(np.arange(10), max_length=9, salt="alpha").length == 9
    # A longer entry of another salt does not replace this one.
    cache.insert(np.arange(12), kv(12, 2.0), salt="beta")
    assert len(cache) == 2 and cache.lookup(np.arange(12), max_length=12, salt="alpha").length == 10


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


class Solo:
    """One sequence through transformers' forward and DynamicCache: the reference for every row."""

    def __init__(self, model, ids):
        self.model, self.cache = model, DynamicCache(config=model.config)
        self.logits = model(input_ids=ids[None], past_key_values=self.cache, use_cache=True).logits[0, -1]

    def kv(self):
        return [(layer.keys[0], layer.values[0]) for layer in self.cache.layers]

    def step(self, token: int):
        self.logits = self.model(input_ids=torch.tensor([[token]]), past_key_values=self.cache, use_cache=True).logits[0, -1]
        return self.logits


def assert_kv_close(ours, theirs, atol=1e-5):
    assert len(ours) == len(theirs)
    for (k, v), (k0, v0) in zip(ours, theirs, strict=True):
        assert k.shape == k0.shape
        torch.testing.assert_close(k, k0, atol=atol, rtol=0)
        torch.testing.assert_close(v, v0, atol=atol, rtol=0)


@torch.inference_mode()
def test_batched_prefill_equals_each_prompt_alone(reference):
    """Three prompts of different lengths in one forward, one continuing from a cached past (left and right padding
    both): every row's logits and KV equal its solo forward."""
    model = reference("qwen2").language_model
    prompts = [torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 17, 9)]
    solo = [Solo(model, ids) for ids in prompts]
    past = Solo(model, prompts[1][:11])  # the 17-token prompt's first 11 positions are cached
    embed = model.get_input_embeddings()
    rows = [PrefillRow(None, 0, embed(prompts[0])), PrefillRow(past.kv(), 11, embed(prompts[1][11:])),
            PrefillRow(None, 0, embed(prompts[2]))]
    hidden, kv = prefill_forward(model, rows)
    logits = model.get_output_embeddings()(hidden)
    for row in range(3):
        torch.testing.assert_close(logits[row], solo[row].logits, atol=1e-4, rtol=0)
        assert_kv_close(kv[row], solo[row].kv())


@torch.inference_mode()
def test_decode_batch_rows_join_leave_and_step_as_alone(reference, monkeypatch):
    monkeypatch.setattr(batch_module, "COLUMN_SLACK", 3)  # rebuilds every few steps, to cover them too
    model = reference("qwen2").language_model
    prompts = [torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 12, 8)]
    solo = [Solo(model, ids) for ids in prompts]
    batch = KVBatch(model)
    batch.add([solo[0].kv()])
    batch.add([solo[1].kv(), solo[2].kv()])  # a longer row joins: the others shift right
    assert batch.width == 12 and batch.lengths == [5, 12, 8]
    for row in range(3):
        assert_kv_close(batch.row(row), solo[row].kv(), atol=0)
    rows = [0, 1, 2]
    for step in range(8):
        if step == 3:
            batch.remove(1)  # the longest leaves; the last row takes its place
            rows = [0, 2]
        tokens = [int(solo[i].logits.argmax()) for i in rows]
        logits = batch.forward(torch.tensor(tokens))
        for row, i in enumerate(rows):
            torch.testing.assert_close(logits[row], solo[i].step(tokens[row]), atol=1e-4, rtol=0)
    assert batch.lengths == [5 + 8, 8 + 8]
    assert_kv_close(batch.row(1), solo[2].kv())
    batch.remove(0)
    batch.remove(0)
    assert len(batch) == 0 and batch.nbytes == 0
