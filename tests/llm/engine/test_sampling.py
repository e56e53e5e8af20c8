"""Sampling against transformers' own logits processors, seeds, logprobs, streaming text and stop strings."""

from __future__ import annotations

import dataclasses
import inspect
from collections import Counter

import numpy as np
import pytest
import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from services.contract.errors import InvalidArgumentError
from services.llm.engine import sampling
from services.llm.engine.detokenize import IncrementalDetokenizer, StopStrings
from services.llm.engine.sampling import Sampler, SamplingParams, sample_batch

VOCAB = 1000
CPU = torch.device("cpu")


def openai_adjusted(scores: torch.Tensor, generated: list[int], params: SamplingParams) -> torch.Tensor:
    """scores [1, vocab] after OpenAI's frequency and presence penalties, then logit_bias, token by token in float32:

        logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty
        logit[j] += logit_bias[j]

    count[j] being how many times token j is among the generated tokens (the prompt is not counted).
    """
    out = scores.clone()
    f32 = np.float32
    if params.frequency_penalty or params.presence_penalty:
        for token, count in Counter(generated).items():  # count > 0 for each
            penalty = f32(count) * f32(params.frequency_penalty) + f32(params.presence_penalty)
            out[0, token] = float(f32(out[0, token].item()) - penalty)
    for token, bias in params.logit_bias:
        out[0, token] = float(f32(out[0, token].item()) + f32(bias))
    return out


class TransformersRow:
    """One sequence sampled as transformers' generate does, alone: its processors, then the global-RNG multinomial.

    `input_ids` are the generated tokens only, as generate(inputs_embeds=...) has them: the prompt is not among them.
    The generator stands for `torch.manual_seed(seed)`'s global one. OpenAI's penalties and logit_bias, which
    transformers has not, come after the repetition penalty (`openai_adjusted`).
    """

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generated: list[int] = []
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None

    def step(self, logits: torch.Tensor) -> int:
        """The next token from logits [vocab]."""
        params = self.params
        ids = torch.tensor([self.generated], dtype=torch.long, device=logits.device)  # [1, generated]
        scores = logits[None].clone()
        if params.penalty:
            scores = RepetitionPenaltyLogitsProcessor(params.penalty)(ids, scores)
        scores = openai_adjusted(scores, self.generated, params)
        if params.greedy:
            token = int(scores.argmax())
        else:
            if params.temperature != 1.0:
                scores = TemperatureLogitsWarper(params.temperature)(ids, scores)
            if params.top_k:
                scores = TopKLogitsWarper(params.top_k)(ids, scores)
            if 0 < params.top_p < 1:
                scores = TopPLogitsWarper(params.top_p)(ids, scores)
            token = int(torch.multinomial(scores.softmax(-1), 1, generator=self.generator)[0, 0])
        self.generated.append(token)
        return token


ROWS = {
    "greedy": SamplingParams(top_logprobs=3),
    "greedy-penalty": SamplingParams(repetition_penalty=1.3),
    "temperature": SamplingParams(temperature=0.7, seed=3),
    "penalty-only": SamplingParams(temperature=1.0, repetition_penalty=1.5, seed=8),
    "top-k": SamplingParams(temperature=1.5, top_k=20, seed=4),
    "top-p": SamplingParams(temperature=1.0, top_p=0.8, seed=5),
    "all": SamplingParams(temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.2, seed=6),
    "reward-logprobs": SamplingParams(temperature=1.2, top_p=0.95, repetition_penalty=0.8, seed=7, top_logprobs=5),
}


# OpenAI's options, alone and with transformers' ones. The biases of -100 ban a hot token; those of +5..8 lift a cold
# one (about -6) among the hot ones.
OPENAI_ROWS = {
    "greedy-frequency": SamplingParams(frequency_penalty=0.8),
    "greedy-presence-bias": SamplingParams(presence_penalty=1.5, logit_bias=((0, -100.0), (500, 6.0)), top_logprobs=2),
    "greedy-reward": SamplingParams(frequency_penalty=0.3, presence_penalty=-1.0),
    "greedy-bias-penalty": SamplingParams(repetition_penalty=1.4, logit_bias=((1, -2.5), (7, 1.5), (640, 5.0))),
    "sampled-frequency": SamplingParams(temperature=0.8, frequency_penalty=0.5, seed=21),
    "sampled-presence": SamplingParams(temperature=1.0, presence_penalty=2.0, seed=23),
    "sampled-all": SamplingParams(temperature=1.1, top_k=40, top_p=0.9, repetition_penalty=1.2, frequency_penalty=-0.4,
                                  presence_penalty=0.6, logit_bias=((3, 2.5), (999, 8.0)), seed=22, top_logprobs=4),
    "sampled-bias": SamplingParams(temperature=0.5, logit_bias=((2, -100.0), (4, -100.0), (321, 7.0)), seed=24),
}


def step_logits(step: int, rows: int) -> torch.Tensor:
    """[rows, VOCAB]: eight "hot" tokens of either sign against a low rest, so that tokens repeat and the penalty's
    two branches (divide a positive logit, multiply a negative one) both decide choices."""
    generator = torch.Generator().manual_seed(1000 + step)
    logits = torch.randn(rows, VOCAB, generator=generator) * 3 - 6
    logits[:, :8] = torch.randn(rows, 8, generator=generator) * 3
    return logits


def test_choices_equal_transformers_processors():
    """Rows of different parameters in one sample_batch call, step after step: each equals transformers alone."""
    names = list(ROWS)
    samplers = [Sampler(ROWS[n], VOCAB, CPU) for n in names]
    references = [TransformersRow(ROWS[n]) for n in names]
    penalty_decided = 0
    for step in range(40):
        logits = step_logits(step, len(names))
        raw_greedy = int(logits[names.index("greedy-penalty")].argmax())
        tokens, reports = sample_batch(logits, samplers)
        expected = [ref.step(logits[row]) for row, ref in enumerate(references)]
        assert tokens == expected, f"step {step}"
        penalty_decided += tokens[names.index("greedy-penalty")] != raw_greedy
        raw = torch.log_softmax(logits, dim=-1)
        for row, name in enumerate(names):
            n = ROWS[name].top_logprobs
            if not n:
                assert reports[row] is None
                continue
            values, ids = torch.topk(raw[row], n)
            assert list(reports[row].token_ids) == ids.tolist()
            assert list(reports[row].logprobs) == pytest.approx(values.tolist(), abs=1e-6)
            assert reports[row].logprob == pytest.approx(float(raw[row, tokens[row]]), abs=1e-6)
    assert penalty_decided >= 3, "the penalty never changed a greedy choice: the test would not see it"


@pytest.mark.parametrize("name", list(ROWS))
def test_each_row_alone_equals_transformers_processors(name):
    sampler, reference = Sampler(ROWS[name], VOCAB, CPU), TransformersRow(ROWS[name])
    for step in range(20):
        logits = step_logits(step, 1)
        assert sample_batch(logits, [sampler])[0] == [reference.step(logits[0])]


def test_transformed_scores_equal_transformers_bit_for_bit():
    """Penalised and warped scores of a batch, element for element, before any draw (a one-bit difference rarely
    changes a draw, so the draws alone would hardly show it)."""
    params = [*ROWS.values(), SamplingParams(temperature=0.6, top_p=1e-9, seed=1)]  # float32(1 - top_p) == 1:
    # every cumulative probability is at most that, and only min_tokens_to_keep keeps the most likely token.
    generated = [3, 5, 0, 900, 7, 5]
    samplers = [Sampler(p, VOCAB, CPU) for p in params]
    for sampler in samplers:
        for token in generated:
            sampler.observe(torch.tensor([token]))
    logits = step_logits(0, len(params))
    logits[:, 900] = -2.5  # a generated token with a negative logit, off the hot ones
    knobs = torch.stack([s.knobs for s in samplers])
    penalised = sampling._penalise(logits, samplers, knobs)
    sampled = [row for row, p in enumerate(params) if not p.greedy]
    warped = sampling._warp(penalised[sampled], [samplers[r] for r in sampled], knobs[sampled])
    ids = torch.tensor([generated])
    for row, p in enumerate(params):
        expected = logits[row:row + 1].clone()
        if p.penalty:
            expected = RepetitionPenaltyLogitsProcessor(p.penalty)(ids, expected)
        assert torch.equal(penalised[row], expected[0]), f"penalty of row {row}"
        if p.greedy:
            continue
        if p.temperature != 1.0:
            expected = TemperatureLogitsWarper(p.temperature)(ids, expected)
        if p.top_k:
            expected = TopKLogitsWarper(p.top_k)(ids, expected)
        if 0 < p.top_p < 1:
            expected = TopPLogitsWarper(p.top_p)(ids, expected)
        assert torch.equal(warped[sampled.index(row)], expected[0]), f"warps of row {row}"
    assert int(torch.isfinite(warped[-1]).sum()) == 1


def test_openai_options_mixed_with_the_others_equal_their_reference_alone():
    """OpenAI's penalties and logit_bias in one sample_batch call with every other kind of row, step after step: each
    row equals its reference (transformers' processors plus the formula) run alone, greedy rows exactly and sampled
    rows draw for draw."""
    params = {**ROWS, **OPENAI_ROWS}
    names = list(params)
    samplers = [Sampler(params[n], VOCAB, CPU) for n in names]
    references = [TransformersRow(params[n]) for n in names]
    # The same greedy rows without OpenAI's options: the options must decide some choices, or the test sees nothing.
    plain = {n: TransformersRow(dataclasses.replace(params[n], frequency_penalty=0.0, presence_penalty=0.0,
                                                    logit_bias=()))
             for n in OPENAI_ROWS if params[n].greedy}
    decided = Counter()
    for step in range(40):
        logits = step_logits(step, len(names))
        tokens, reports = sample_batch(logits, samplers)
        expected = [ref.step(logits[row]) for row, ref in enumerate(references)]
        assert tokens == expected, f"step {step}"
        for name, reference in plain.items():
            row = names.index(name)
            reference.generated = list(references[row].generated[:-1])  # the same history, without the options
            decided[name] += reference.step(logits[row]) != tokens[row]
        raw = torch.log_softmax(logits, dim=-1)
        for row, name in enumerate(names):
            if params[name].top_logprobs:  # still the raw log-softmax, whatever the options
                values, ids = torch.topk(raw[row], params[name].top_logprobs)
                assert list(reports[row].token_ids) == ids.tolist()
                assert list(reports[row].logprobs) == pytest.approx(values.tolist(), abs=1e-6)
    assert all(decided[name] >= 3 for name in plain), decided
    banned = names.index("greedy-presence-bias")
    assert 0 not in references[banned].generated and 500 in references[banned].generated


def test_openai_options_each_row_alone_equals_its_reference():
    for name, params in OPENAI_ROWS.items():
        sampler, reference = Sampler(params, VOCAB, CPU), TransformersRow(params)
        for step in range(20):
            logits = step_logits(step, 1)
            assert sample_batch(logits, [sampler])[0] == [reference.step(logits[0])], f"{name} step {step}"


def test_frequency_presence_and_bias_by_hand():
    """One greedy step whose winner follows from the formula worked out by hand."""
    logits = torch.full((1, VOCAB), -10.0)
    logits[0, 5], logits[0, 6], logits[0, 7] = 3.0, 2.0, 1.0
    generated = [5, 5, 6]
    # token 5: 3 - (2 * 0.4 + 0.5) = 1.7; token 6: 2 - (1 * 0.4 + 0.5) = 1.1; token 7, not generated: 1 + bias.
    for bias, winner in [(0.5, 5), (0.8, 7), (-1.0, 5)]:
        params = SamplingParams(frequency_penalty=0.4, presence_penalty=0.5, logit_bias=((7, bias),))
        sampler = Sampler(params, VOCAB, CPU)
        assert not sampler.plain_greedy
        for token in generated:
            sampler.observe(torch.tensor([token]))
        assert sample_batch(logits, [sampler])[0] == [winner], bias
    # Without the presence penalty token 5 keeps 3 - 0.8 = 2.2 and wins over 7 at 1.8.
    sampler = Sampler(SamplingParams(frequency_penalty=0.4, logit_bias=((7, 0.8),)), VOCAB, CPU)
    for token in generated:
        sampler.observe(torch.tensor([token]))
    # The scores themselves, element for element (before sample_batch counts its own token).
    knobs = sampler.knobs[None]
    scores = sampling._add_bias(sampling._penalise_counts(logits, [sampler], knobs), [sampler])
    f32 = np.float32
    expected = logits.clone()
    expected[0, 5] = float(f32(3.0) - f32(2) * f32(0.4))
    expected[0, 6] = float(f32(2.0) - f32(1) * f32(0.4))
    expected[0, 7] = float(f32(1.0) + f32(0.8))
    assert torch.equal(scores, expected)
    assert sample_batch(logits, [sampler])[0] == [5]


def test_rows_without_openai_options_unchanged_bit_for_bit():
    """The neutral elements the batched step uses for rows without an option keep every float, -0.0 and inf too."""
    logits = torch.tensor([[-0.0, 0.0, float("inf"), float("-inf"), 1.5, -2.25] + [0.0] * (VOCAB - 6)] * 2)
    samplers = [Sampler(SamplingParams(temperature=1.0, seed=1), VOCAB, CPU),
                Sampler(SamplingParams(frequency_penalty=1.0, presence_penalty=1.0, logit_bias=((4, 1.0),)), VOCAB,
                        CPU)]
    samplers[1].observe(torch.tensor([5]))
    knobs = torch.stack([s.knobs for s in samplers])
    out = sampling._add_bias(sampling._penalise_counts(logits, samplers, knobs), samplers)
    assert torch.equal(out[0], logits[0]) and torch.equal(torch.signbit(out[0]), torch.signbit(logits[0]))
    assert out[1, 4] == 2.5 and out[1, 5] == -4.25


def test_logit_bias_outside_the_vocabulary_refused():
    with pytest.raises(InvalidArgumentError, match=rf"token id {VOCAB} .*{VOCAB} tokens"):
        Sampler(SamplingParams(logit_bias=((3, 1.0), (VOCAB, 1.0))), VOCAB, CPU)
    Sampler(SamplingParams(logit_bias=((VOCAB - 1, 1.0),)), VOCAB, CPU)  # the last id is fine


@pytest.mark.parametrize("params", [
    SamplingParams(frequency_penalty=0.1), SamplingParams(presence_penalty=-0.1),
    SamplingParams(logit_bias=((1, 0.0),)),
])
def test_openai_options_are_not_plain_greedy(params):
    assert not Sampler(params, VOCAB, CPU).plain_greedy
    assert Sampler(SamplingParams(), VOCAB, CPU).plain_greedy


def test_penalty_counts_generated_tokens_not_the_prompt():
    """The sampler knows no prompt: a token of the prompt is not penalised until the sequence generates it."""
    params = SamplingParams(repetition_penalty=1.3)
    assert "prompt_ids" not in inspect.signature(Sampler).parameters
    with pytest.raises(TypeError):
        Sampler(params, VOCAB, CPU, torch.tensor([5]))  # the former prompt_ids argument is gone
    logits = torch.zeros(1, VOCAB)
    logits[0, 5], logits[0, 6] = 2.0, 1.9  # token 5 stands for a prompt token: 2.0 / 1.3 would lose to 1.9
    sampler = Sampler(params, VOCAB, CPU)
    assert sample_batch(logits, [sampler])[0] == [5]
    # Generated once, it is penalised from the next step on, as transformers does with input_ids == [5].
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([[5]]), logits.clone()).argmax(-1).tolist()
    assert sample_batch(logits, [sampler])[0] == expected == [6]


def test_same_seed_same_tokens_regardless_of_batch():
    params = SamplingParams(temperature=1.0, seed=11)
    steps = [torch.randn(VOCAB, generator=torch.Generator().manual_seed(s)) for s in range(6)]
    noise = torch.Generator().manual_seed(100)

    def run(row: int, neighbours: list[SamplingParams]) -> list[int]:
        """Tokens of a `params` sampler at `row` of each step's batch, among samplers of `neighbours` (whose rows
        get other logits)."""
        samplers = [Sampler(p, VOCAB, CPU) for p in neighbours]
        samplers.insert(row, Sampler(params, VOCAB, CPU))
        tokens = []
        for logits in steps:
            batch = list(torch.randn(len(neighbours), VOCAB, generator=noise))
            batch.insert(row, logits)
            tokens.append(sample_batch(torch.stack(batch), samplers)[0][row])
        return tokens

    alone = run(0, [])
    assert run(1, [SamplingParams(temperature=1.0, seed=99)]) == alone
    assert run(0, [SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.4, seed=1), SamplingParams()]) == alone
    assert run(2, [SamplingParams(top_logprobs=2), SamplingParams(temperature=2.0, top_p=0.5, seed=11)]) == alone
    other = Sampler(SamplingParams(temperature=1.0, seed=12), VOCAB, CPU)
    assert [sample_batch(logits[None], [other])[0][0] for logits in steps] != alone


def test_top_logprobs_are_raw_log_softmax():
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(1))
    samplers = [Sampler(SamplingParams(temperature=5.0, top_k=3, seed=1, top_logprobs=4), VOCAB, CPU),
                Sampler(SamplingParams(top_logprobs=2), VOCAB, CPU)]
    tokens, reports = sample_batch(logits, samplers)
    expected = torch.log_softmax(logits, dim=-1)
    for row, (token, report) in enumerate(zip(tokens, reports, strict=True)):
        values, ids = torch.topk(expected[row], samplers[row].params.top_logprobs)
        assert list(report.token_ids) == ids.tolist()
        assert list(report.logprobs) == pytest.approx(values.tolist(), abs=1e-6)
        assert report.logprob == pytest.approx(float(expected[row, token]), abs=1e-6)
    assert tokens[1] == int(logits[1].argmax())
    assert sample_batch(logits, [Sampler(SamplingParams(), VOCAB, CPU)] * 2)[1] == [None, None]


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
    assert detokenizer.flush() == ""
    # Special tokens are skipped, as the original decodes its answer.
    special = IncrementalDetokenizer(tokenizer)
    assert [special.add(i) for i in tokenizer.convert_tokens_to_ids(["<|im_end|>", "<img>"])] == ["", ""]


def test_flush_returns_the_text_held_inside_a_multibyte_character(reference):
    """Ids that end inside a character: the deltas plus flush() equal the full decode, replacement chars included."""
    tokenizer = reference("qwen2").tokenizer
    emoji = "\U0001F32D"  # 🌭: byte-level BPE splits it into partial UTF-8 sequences (" 🌭" into three tokens)
    assert len(tokenizer(emoji).input_ids) == 2
    ids = tokenizer(f"Hot {emoji} dog, {emoji}{emoji}").input_ids
    cuts = [cut for cut in range(1, len(ids) + 1) if tokenizer.decode(ids[:cut]).endswith("\ufffd")]
    assert len(cuts) >= 3  # inside each of the three emoji
    for cut in cuts:
        detokenizer = IncrementalDetokenizer(tokenizer)
        sent = "".join(detokenizer.add(i) for i in ids[:cut])
        held = detokenizer.flush()
        assert held.endswith("\ufffd")
        assert sent + held == tokenizer.decode(ids[:cut], skip_special_tokens=True)
        assert detokenizer.flush() == ""
    # A stream that ends on a whole character holds nothing back.
    whole = IncrementalDetokenizer(tokenizer)
    assert "".join(whole.add(i) for i in ids) == tokenizer.decode(ids) and whole.flush() == ""


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
