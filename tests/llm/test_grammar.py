"""Constrained decoding against the tiny checkpoint's real tokenizer: random logits, every answer valid.

The logits are seeded noise over the model's whole vocabulary (whatever a model might say), the answers are decoded
with the tokenizer and checked by independent means: `json` and `jsonschema`, `re.fullmatch`, the list of choices.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
import xgrammar
from helpers.schemas import SCHEMA

from services.contract.constraint import Constraint, ConstraintKind
from services.contract.errors import InvalidArgumentError
from services.llm.engine import sampling
from services.llm.engine.sampling import Sampler, SamplingParams, sample_batch
from services.llm.grammar import Grammars

CPU = torch.device("cpu")
STEPS = 200

TRICKY_CHOICES = ('say "hi"', "back\\slash", "new\nline", "tab\there", "Grüße, 世界 😀", "a", "ab", "{not json")


class Tiny:
    """The tiny checkpoint's tokenizer, its stop token, its model's vocabulary size and the shared `Grammars`."""

    def __init__(self, chat):
        self.tokenizer = chat.tokenizer
        self.stop = chat.stop_id
        config = json.loads((Path(chat.checkpoint.path) / "config.json").read_text())
        self.vocab = config["llm_config"]["vocab_size"]
        assert self.vocab == chat.language_model.get_output_embeddings().weight.shape[0]
        self.grammars = Grammars(self.tokenizer, self.vocab, self.stop)
        # Every added token (special or not) but the stop token: never to be allowed by a constraint.
        self.forbidden = sorted(set(self.tokenizer.added_tokens_decoder) - {self.stop})
        vocab = self.tokenizer.get_vocab()
        # Tokens whose text closes a JSON string, object or array: what the "closing" logits favour.
        self.closers = [i for token, i in vocab.items() if any(c in token for c in '"}]')] + [self.stop]

    def compile(self, kind: ConstraintKind, **fields) -> xgrammar.CompiledGrammar:
        return self.grammars.compile(Constraint(kind, **fields))

    def logits(self, seed: int, step: int, closing: float = 0.0) -> torch.Tensor:
        """[1, vocab] noise of step `step` of stream `seed`; `closing` > 0 lifts the closers by closing * step, so
        that an unbounded grammar (any object, [a-z]+) ends within the steps while its first steps are noise."""
        logits = torch.randn(1, self.vocab, generator=torch.Generator().manual_seed(seed * 100_000 + step)) * 3
        if closing:
            logits[0, self.closers] += closing * step
        return logits

    def text(self, tokens: list[int]) -> str:
        """The answer of a finished run: the tokens before the stop token, decoded."""
        assert tokens[-1] == self.stop, f"no stop token within {STEPS} steps: {self.tokenizer.decode(tokens)!r}"
        text = self.tokenizer.decode(tokens[:-1])
        assert text == self.tokenizer.decode(tokens[:-1], skip_special_tokens=True)  # no special token among them
        return text


@pytest.fixture(scope="module")
def tiny(reference) -> Tiny:
    return Tiny(reference("qwen2"))


def run(tiny: Tiny, params: SamplingParams, grammar, seed: int, closing: float = 0.0) -> list[int]:
    """The tokens of one sequence sampled alone until its stop token (or STEPS), each step checked against an
    independent matcher of the same grammar: no forbidden token allowed, the stop token only when it may end."""
    sampler = Sampler(params, tiny.vocab, CPU, grammar=grammar)
    assert sampler.constrained and not sampler.plain_greedy
    witness = xgrammar.GrammarMatcher(grammar)
    bitmask = xgrammar.allocate_token_bitmask(1, tiny.vocab)
    tokens: list[int] = []
    for step in range(STEPS):
        witness.fill_next_token_bitmask(bitmask, 0)
        allowed = unpack(bitmask[0], tiny.vocab)
        assert not allowed[tiny.forbidden].any(), f"step {step}: an added token is allowed"
        [token], _ = sample_batch(tiny.logits(seed, step, closing), [sampler])
        assert allowed[token]
        assert witness.accept_token(token)
        tokens.append(token)
        if token == tiny.stop:
            assert sampler.grammar_done and witness.is_terminated()
            break
        assert not sampler.grammar_done
    return tokens


def unpack(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """[vocab] bool of a bitmask row [ceil(vocab / 32)] int32 as xgrammar documents it (token j: bit j % 32 of word
    j // 32), read as little-endian bytes, least significant bit first."""
    bits = np.unpackbits(words.numpy().astype("<i4").view(np.uint8), bitorder="little")[:vocab]
    return torch.from_numpy(bits.astype(bool))


PARAMS = [
    SamplingParams(),
    SamplingParams(temperature=1.0, seed=1),
    SamplingParams(temperature=0.7, top_p=0.9, seed=2),
    SamplingParams(temperature=1.3, top_k=50, repetition_penalty=1.2, frequency_penalty=0.5, seed=3),
]


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "t1", "top-p", "mixed"])
def test_json_schema_answers_validate(tiny, params, strict):
    grammar = tiny.compile(ConstraintKind.JSON_SCHEMA, schema=json.dumps(SCHEMA), strict=strict)
    answer = json.loads(tiny.text(run(tiny, params, grammar, seed=10 + (params.seed or 0))))
    jsonschema.validate(answer, SCHEMA)


@pytest.mark.parametrize("params", PARAMS[:3], ids=["greedy", "t1", "top-p"])
def test_json_object_answers_are_objects(tiny, params):
    grammar = tiny.compile(ConstraintKind.JSON_OBJECT)
    answer = json.loads(tiny.text(run(tiny, params, grammar, seed=20 + (params.seed or 0), closing=0.15)))
    assert isinstance(answer, dict)


def test_choice_answers_are_exactly_one_choice(tiny):
    grammar = tiny.compile(ConstraintKind.CHOICE, choices=TRICKY_CHOICES)
    answers = set()
    for seed in range(12):
        params = SamplingParams() if seed == 0 else SamplingParams(temperature=1.0, seed=seed)
        answers.add(tiny.text(run(tiny, params, grammar, seed=30 + seed, closing=0.05)))
    assert answers <= set(TRICKY_CHOICES)
    assert len(answers) >= 3, answers  # the noise reaches several of them, not one by luck


def test_every_tricky_choice_is_accepted_and_nothing_else(tiny):
    """The literals' escaping: each choice's own tokens reach the stop token; a prefix or a longer text does not."""
    grammar = tiny.compile(ConstraintKind.CHOICE, choices=TRICKY_CHOICES)
    for choice in TRICKY_CHOICES:
        matcher = xgrammar.GrammarMatcher(grammar)
        assert all(matcher.accept_token(t) for t in tiny.tokenizer.encode(choice)), choice
        assert matcher.accept_token(tiny.stop), choice
    for other in ('say "hi', "back\\\\slash", "newline", "Grüße, 世界", "abc", "b"):
        matcher = xgrammar.GrammarMatcher(grammar)
        ok = all(matcher.accept_token(t) for t in tiny.tokenizer.encode(other))
        assert not (ok and matcher.accept_token(tiny.stop)), other


@pytest.mark.parametrize("params", PARAMS[:3], ids=["greedy", "t1", "top-p"])
def test_regex_answers_match_in_full(tiny, params):
    grammar = tiny.compile(ConstraintKind.REGEX, pattern="[0-9]{3}-[a-z]+")
    text = tiny.text(run(tiny, params, grammar, seed=40 + (params.seed or 0), closing=0.1))
    assert re.fullmatch("[0-9]{3}-[a-z]+", text), text


def test_constrained_and_free_rows_in_one_batch_equal_their_solo_runs(tiny):
    schema = tiny.compile(ConstraintKind.JSON_SCHEMA, schema=json.dumps(SCHEMA))
    choice = tiny.compile(ConstraintKind.CHOICE, choices=TRICKY_CHOICES)
    regex = tiny.compile(ConstraintKind.REGEX, pattern="[0-9]{3}-[a-z]+")
    rows = [  # params, grammar, closing
        (SamplingParams(), None, 0.0),
        (SamplingParams(temperature=1.0, seed=5), schema, 0.0),
        (SamplingParams(temperature=0.8, top_k=30, frequency_penalty=1.0, seed=6), None, 0.0),
        (SamplingParams(), regex, 0.1),
        (SamplingParams(temperature=1.0, seed=7, logit_bias=((100, 5.0),)), choice, 0.05),
        (SamplingParams(presence_penalty=0.7), schema, 0.0),
    ]
    seeds = [50 + r for r in range(len(rows))]
    samplers = [Sampler(p, tiny.vocab, CPU, grammar=g) for p, g, _ in rows]
    together: list[list[int]] = [[] for _ in rows]
    live = list(range(len(rows)))
    for step in range(STEPS // 2):
        logits = torch.cat([tiny.logits(seeds[r], step, rows[r][2]) for r in live])
        tokens, _ = sample_batch(logits, [samplers[r] for r in live])
        for r, token in zip(live, tokens, strict=True):
            together[r].append(token)
        live = [r for r in live if together[r][-1] != tiny.stop]  # a finished sequence leaves the batch
    assert all(together[r][-1] == tiny.stop for r, (_, g, _) in enumerate(rows) if g is not None)
    for r, (params, grammar, closing) in enumerate(rows):
        sampler = Sampler(params, tiny.vocab, CPU, grammar=grammar)
        alone = []
        for step in range(len(together[r])):
            alone += sample_batch(tiny.logits(seeds[r], step, closing), [sampler])[0]
        assert alone == together[r], f"row {r}"
    jsonschema.validate(json.loads(tiny.text(together[1])), SCHEMA)
    assert tiny.text(together[4]) in TRICKY_CHOICES


def test_greedy_under_a_choice_mask_by_hand(tiny):
    """The first step of choices "yes" / "no" / "maybe": the allowed tokens are those whose text is a non-empty
    prefix of a choice (for ASCII letters a byte-level token's string is its text), and greedy takes the largest
    logit among them, logit_bias included."""
    choices = ("yes", "no", "maybe")
    grammar = tiny.compile(ConstraintKind.CHOICE, choices=choices)
    allowed = sorted(i for token, i in tiny.tokenizer.get_vocab().items()
                     if token and any(c.startswith(token) for c in choices))
    assert {tiny.tokenizer.decode([i]) for i in allowed} >= {"y", "yes", "n", "no", "m", "maybe"}
    for seed in range(5):
        logits = tiny.logits(60 + seed, 0)
        bias_token = allowed[seed % len(allowed)]
        params = SamplingParams(logit_bias=((bias_token, 4.0), (tiny.stop, 100.0)))
        expected = logits[0].clone()
        expected[bias_token] += 4.0  # the stop token's bias is masked away: "" is no choice
        expected_token = allowed[int(expected[allowed].argmax())]
        sampler = Sampler(params, tiny.vocab, CPU, grammar=grammar)
        assert torch.isfinite(sampling._mask(logits, [sampler])[0]).nonzero().flatten().tolist() == allowed
        assert sample_batch(logits, [sampler])[0] == [expected_token]
        # Sampled: only allowed tokens are ever drawn.
        hot = Sampler(SamplingParams(temperature=5.0, seed=seed), tiny.vocab, CPU, grammar=grammar)
        assert sample_batch(logits, [hot])[0][0] in allowed


def test_mask_equals_xgrammars_kernel(tiny):
    """The sampler's unpacking of the bitmask against xgrammar's own CPU kernel, rows with and without a grammar."""
    grammar = tiny.compile(ConstraintKind.JSON_SCHEMA, schema=json.dumps(SCHEMA))
    samplers = [Sampler(SamplingParams(), tiny.vocab, CPU),
                Sampler(SamplingParams(), tiny.vocab, CPU, grammar=grammar),
                Sampler(SamplingParams(temperature=1.0, seed=1), tiny.vocab, CPU),
                Sampler(SamplingParams(), tiny.vocab, CPU, grammar=grammar)]
    assert samplers[3].matcher.accept_string('{"name": "ab')  # another state than row 1's
    logits = torch.cat([tiny.logits(70, r) for r in range(4)])
    masked = sampling._mask(logits, samplers)
    bitmask = xgrammar.allocate_token_bitmask(4, tiny.vocab)
    samplers[1].matcher.fill_next_token_bitmask(bitmask, 1)
    samplers[3].matcher.fill_next_token_bitmask(bitmask, 3)
    expected = logits.clone()
    xgrammar.apply_token_bitmask_inplace(expected, bitmask, indices=[1, 3])
    assert torch.equal(masked, expected)
    assert torch.equal(masked[[0, 2]], logits[[0, 2]])
    # Row 1 may only open the object; row 3, inside a string, may say almost anything but an added token.
    assert 0 < int(torch.isfinite(masked[1]).sum()) < int(torch.isfinite(masked[3]).sum()) < tiny.vocab


def test_added_tokens_never_allowed(tiny):
    """xgrammar's TokenizerInfo sees every added token as special (from_huggingface alone finds none of them, their
    strings being printable text), so no grammar state allows one: not inside an open JSON string, where any text
    is allowed, not anywhere. The stop token only where the answer may end."""
    info = tiny.grammars.tokenizer_info
    assert set(tiny.forbidden) <= set(info.special_token_ids)
    assert info.stop_token_ids == [tiny.stop]
    grammar = tiny.compile(ConstraintKind.JSON_SCHEMA, schema='{"type": "object", "properties": {"a": {"type": '
                                                              '"string"}}, "required": ["a"]}')
    bitmask = xgrammar.allocate_token_bitmask(1, tiny.vocab)
    matcher = xgrammar.GrammarMatcher(grammar)
    for text in ("", '{"a": "', "x <img", "> ", '"'):
        assert matcher.accept_string(text)
        matcher.fill_next_token_bitmask(bitmask, 0)
        allowed = unpack(bitmask[0], tiny.vocab)
        assert not allowed[tiny.forbidden].any(), text
        assert not allowed[tiny.stop]
    assert matcher.accept_string("}")
    matcher.fill_next_token_bitmask(bitmask, 0)
    assert unpack(bitmask[0], tiny.vocab).nonzero().flatten().tolist() == [tiny.stop]  # only the end is left
    # The literal text of an added token, spelled in ordinary tokens, is an ordinary string.
    ordinary = tiny.tokenizer.encode("<img>", split_special_tokens=True)
    assert not set(ordinary) & set(tiny.forbidden)
    matcher = xgrammar.GrammarMatcher(grammar)
    assert matcher.accept_string('{"a": "') and all(matcher.accept_token(t) for t in ordinary)


def test_padded_vocabulary_rows_never_allowed(tiny):
    """A model whose lm_head has more rows than the tokenizer has tokens: the extra rows are never allowed."""
    padded = Grammars(tiny.tokenizer, tiny.vocab + 64, tiny.stop)
    grammar = padded.compile(Constraint(ConstraintKind.REGEX, pattern="[a-z ]+"))
    matcher = xgrammar.GrammarMatcher(grammar)
    bitmask = xgrammar.allocate_token_bitmask(1, tiny.vocab + 64)
    matcher.fill_next_token_bitmask(bitmask, 0)
    allowed = unpack(bitmask[0], tiny.vocab + 64)
    assert allowed.any() and not allowed[tiny.vocab:].any() and not allowed[tiny.forbidden].any()
    with pytest.raises(ValueError, match=f"compiled for {tiny.vocab + 64} tokens, the logits have {tiny.vocab}"):
        Sampler(SamplingParams(), tiny.vocab, CPU, grammar=grammar)


@pytest.mark.parametrize("constraint, message", [
    (Constraint(ConstraintKind.JSON_SCHEMA, schema='{"type": "nonsense"}'), 'json_schema: Unsupported type "nonsense"'),
    (Constraint(ConstraintKind.JSON_SCHEMA, schema='{"type": "integer", "minimum": 5, "maximum": 2}'),
     "json_schema: Invalid range: minimum greater than maximum"),
    (Constraint(ConstraintKind.REGEX, pattern="[0-9"), "regex: Regex parsing error at position 5: Unclosed '['"),
    (Constraint(ConstraintKind.REGEX, pattern="(?<=a)b"),
     "regex: Regex parsing error at position 3: Lookbehind is not supported yet."),
])
def test_invalid_constraints_refused_with_the_reason(tiny, constraint, message):
    """The kind, then xgrammar's reason without its time and C++ source position."""
    with pytest.raises(InvalidArgumentError) as caught:
        tiny.grammars.compile(constraint)
    assert str(caught.value) == message


def test_same_schema_compiled_once(tiny):
    """xgrammar's cache (keyed by the grammar): the second compile of a schema adds nothing to it; a schema whose
    grammar differs (here by `strict`, which matters without additionalProperties) is another entry."""
    compiler = tiny.grammars.compiler
    open_schema = {k: v for k, v in SCHEMA.items() if k != "additionalProperties"}
    schema = json.dumps({**open_schema, "properties": {**SCHEMA["properties"], "only_in_this_test": {"type": "null"}}})
    before = compiler.get_cache_size_bytes()
    first = tiny.compile(ConstraintKind.JSON_SCHEMA, schema=schema)
    grown = compiler.get_cache_size_bytes()
    second = tiny.compile(ConstraintKind.JSON_SCHEMA, schema=schema)
    assert grown > before and compiler.get_cache_size_bytes() == grown
    assert second.memory_size_bytes == first.memory_size_bytes
    tiny.compile(ConstraintKind.JSON_SCHEMA, schema=schema, strict=True)  # no other properties: another grammar
    assert compiler.get_cache_size_bytes() > grown


def test_a_refused_token_fails_the_call_and_changes_no_state(tiny):
    """A token the matcher refuses (the mask makes it impossible: forced here) fails the call; the other row's
    matcher is rolled back and no counts move, so that the engine's row-by-row retry starts from the same state."""
    grammar = tiny.compile(ConstraintKind.REGEX, pattern="[0-9]{3}-[a-z]+")

    class Refusing:
        def __init__(self, matcher):
            self.matcher = matcher

        def __getattr__(self, name):
            return getattr(self.matcher, name)

        def accept_token(self, token):
            return False

    params = SamplingParams(frequency_penalty=1.0)
    good, bad = (Sampler(params, tiny.vocab, CPU, grammar=grammar) for _ in range(2))
    bad.matcher = Refusing(bad.matcher)
    logits = torch.cat([tiny.logits(80, 0), tiny.logits(81, 0)])
    with pytest.raises(RuntimeError, match="refused token"):
        sample_batch(logits, [good, bad])
    assert not good.counts.any() and not bad.counts.any()
    fresh = Sampler(params, tiny.vocab, CPU, grammar=grammar)
    for step in range(4):  # the rolled-back row goes on exactly as a row that never saw the failed call
        step_logits = tiny.logits(82, step)
        assert sample_batch(step_logits, [good])[0] == sample_batch(step_logits, [fresh])[0]
    with pytest.raises(RuntimeError, match="refused token"):
        sample_batch(logits[1:], [bad])  # alone, it fails alone


def test_constraint_without_its_grammar_refused(tiny):
    params = SamplingParams(constraint=Constraint(ConstraintKind.JSON_OBJECT))
    with pytest.raises(ValueError, match="json_object constraint needs its compiled grammar"):
        Sampler(params, tiny.vocab, CPU)
    assert not Sampler(SamplingParams(), tiny.vocab, CPU).constrained


def test_sampling_after_the_grammar_ended_fails(tiny):
    grammar = tiny.compile(ConstraintKind.CHOICE, choices=("a",))
    sampler = Sampler(SamplingParams(), tiny.vocab, CPU, grammar=grammar)
    assert sampler.constrained and not sampler.grammar_done
    tokens = [sample_batch(tiny.logits(90, step), [sampler])[0][0] for step in range(2)]
    assert tokens == [tiny.tokenizer.convert_tokens_to_ids("a"), tiny.stop] and sampler.grammar_done
    with pytest.raises(RuntimeError, match="already accepted the stop token"):
        sample_batch(tiny.logits(90, 2), [sampler])
