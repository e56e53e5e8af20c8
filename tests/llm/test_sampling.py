"""Sampling against transformers' own logits processors, seeds, logprobs, streaming text and stop strings."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from services.common.contract.errors import InvalidArgumentError
from services.llm.detokenize import IncrementalDetokenizer, StopStrings
from services.llm.sampling import Sampler, SamplingParams, sample_batch

VOCAB = 1000


def hf_choice(logits, seen, params: SamplingParams, seed: int) -> int:
    """transformers' generate order: penalty, temperature, top-k, top-p, softmax, multinomial."""
    scores = logits[None].clone()
    ids = seen[None]
    if params.penalty:
        scores = RepetitionPenaltyLogitsProcessor(params.penalty)(ids, scores)
    if params.greedy:
        return int(scores.argmax())
    scores = TemperatureLogitsWarper(params.temperature)(ids, scores)
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(ids, scores)
    if 0 < params.top_p < 1:
        scores = TopPLogitsWarper(params.top_p)(ids, scores)
    generator = torch.Generator().manual_seed(seed)
    return int(torch.multinomial(scores.softmax(-1)[0], 1, generator=generator))


@pytest.mark.parametrize("params", [
    SamplingParams(),
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(temperature=0.7, seed=3),
    SamplingParams(temperature=1.5, top_k=20, seed=4),
    SamplingParams(temperature=1.0, top_p=0.8, seed=5),
    SamplingParams(temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.2, seed=6),
], ids=["greedy", "greedy-penalty", "temperature", "top-k", "top-p", "all"])
def test_choices_equal_transformers_processors(params):
    for trial in range(20):
        logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(trial)) * 3
        prompt = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(100 + trial))
        sampler = Sampler(params, VOCAB, torch.device("cpu"), prompt)
        assert sampler.choose(logits) == hf_choice(logits, prompt, params, params.seed or 0)


def test_same_seed_same_tokens_regardless_of_batch():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, seed=11)

    def run(rows):
        sampler = Sampler(params, VOCAB, torch.device("cpu"))
        return [sampler.choose(logits[r]) for r in rows]

    alone = run([0, 1, 2, 3])
    batched_sampler = Sampler(params, VOCAB, torch.device("cpu"))
    neighbour = Sampler(SamplingParams(temperature=1.0, seed=99), VOCAB, torch.device("cpu"))
    batched = [sample_batch(torch.stack([logits[r], logits[r]]), [neighbour, batched_sampler])[0][1]
               for r in range(4)]
    assert batched == alone
    other = Sampler(SamplingParams(temperature=1.0, seed=12), VOCAB, torch.device("cpu"))
    assert [other.choose(logits[r]) for r in range(4)] != alone


def test_top_logprobs_are_raw_log_softmax():
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(1))
    samplers = [Sampler(SamplingParams(temperature=5.0, top_k=3, seed=1, top_logprobs=4), VOCAB, torch.device("cpu")),
                Sampler(SamplingParams(top_logprobs=2), VOCAB, torch.device("cpu"))]
    tokens, reports = sample_batch(logits, samplers)
    expected = torch.log_softmax(logits, dim=-1)
    for row, (token, report) in enumerate(zip(tokens, reports, strict=True)):
        values, ids = torch.topk(expected[row], samplers[row].params.top_logprobs)
        assert list(report.token_ids) == ids.tolist()
        assert list(report.logprobs) == pytest.approx(values.tolist(), abs=1e-6)
        assert report.logprob == pytest.approx(float(expected[row, token]), abs=1e-6)
    assert tokens[1] == int(logits[1].argmax())
    assert sample_batch(logits, [Sampler(SamplingParams(), VOCAB, torch.device("cpu"))] * 2)[1] == [None, None]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=-1), SamplingParams(top_p=1.5), SamplingParams(top_k=-1),
    SamplingParams(max_new_tokens=-2), SamplingParams(top_logprobs=21), SamplingParams(stop_strings=("",)),
    SamplingParams(temperature=float("nan")),
])
def test_invalid_params(params):
    with pytest.raises(InvalidArgumentError):
        params.validate()


def test_incremental_text_equals_full_decode(reference):
    tokenizer = reference("qwen2").tokenizer
    text = "Hello 世界! Ünïcödé 😀 emoji, 你好，书生·万象。 done"
    ids = tokenizer(text).input_ids
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add(i) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert all("\ufffd" not in p for p in pieces)
    # Special tokens are skipped, as the original decodes its answer.
    special = IncrementalDetokenizer(tokenizer)
    assert [special.add(i) for i in tokenizer.convert_tokens_to_ids(["<|im_end|>", "<img>"])] == ["", ""]


def test_stop_strings():
    stops = StopStrings(["END", "\n\n"])
    sent = [stops.feed(d) for d in ["Hello E", "N", "ough. ", "Now EN", "D and more"]]
    assert sent == [("Hello ", False), ("", False), ("ENough. ", False), ("Now ", False), ("", True)]
    assert stops.text == "Hello ENough. Now "
    tail = StopStrings(["STOP"])
    assert tail.feed("ab ST") == ("ab ", False)
    assert tail.flush() == "ST"
    assert StopStrings([]).feed("anything") == ("anything", False)
    # A stop string inside one delta cuts it there.
    assert StopStrings(["cd"]).feed("abcdef") == ("ab", True)
