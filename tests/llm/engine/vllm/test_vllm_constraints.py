"""Constrained decoding on the vLLM engine, both language-model families (conftest.py `family`): vLLM's xgrammar
backend compiling our grammar over our vocabulary.

The answers are checked by independent means (`json` and `jsonschema`, `re.fullmatch`, the list of choices); the
special tokens and the end of turn are forced by logit bias, so a mask that let them through would show; greedy
constrained answers equal the transformers engine's on the same checkpoint (same grammar text, same vocabulary, so the
same mask; both engines' logits agree within 4e-6, far below the margins between the top tokens here); and what the
service refuses, it refuses with the transformers engine's messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re

import jsonschema
import pytest
from helpers.engine import Recorder
from helpers.schemas import SCHEMA

from services.contract.constraint import Constraint, ConstraintKind
from services.contract.conversation import Conversation, GenerateRequest
from services.contract.errors import InvalidArgumentError
from services.contract.finish import FinishReason
from services.contract.sampling import SamplingParams
from services.llm.config import LLMConfig
from services.llm.engine import factory
from services.llm.engine.factory import build_engine
from services.llm.grammar import Grammars
from services.llm.service import LLMService

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]

# Every string and number bounded, so that any answer the grammar allows ends within MAX_NEW tokens.
PATTERN = "[0-9]{3}-[a-z]{1,8}"
CHOICES = ('say "hi"', "back\\slash", "new\nline", "Grüße, 世界 😀", "a", "ab", "{not json")
MAX_NEW = 120
QUESTION = Conversation(user_parts=("Describe a thing in the requested format.",))


def schema(strict: bool = False) -> Constraint:
    return Constraint(ConstraintKind.JSON_SCHEMA, schema=json.dumps(SCHEMA), strict=strict)


REGEX = Constraint(ConstraintKind.REGEX, pattern=PATTERN)
CHOICE = Constraint(ConstraintKind.CHOICE, choices=CHOICES)


@pytest.fixture(scope="session")
def grammars():
    """The service's compiler of each family's vocabulary (an engine request carries the compiled grammar)."""
    made: dict[str, Grammars] = {}

    def get(family) -> Grammars:
        if family.name not in made:
            tokenizer = family.chat.tokenizer
            made[family.name] = Grammars(tokenizer, family.native.config.text_config.vocab_size, family.stop_id)
        return made[family.name]

    return get


def constrained(family, grammars, constraint: Constraint | None, conversation=QUESTION, **sampling):
    sampling.setdefault("max_new_tokens", MAX_NEW)
    request = family.request(conversation, constraint=constraint, **sampling)
    if constraint is None:
        return request
    return dataclasses.replace(request, grammar=grammars(family).compile(constraint))


async def run(family, grammars, constraint, **sampling):
    [answer] = await family.collect(family.engine.submit(constrained(family, grammars, constraint, **sampling)))
    return answer


def closer_bias(family, token: str, bias: float) -> tuple[tuple[int, float], ...]:
    """A logit bias on `token`, e.g. "}", so that an unbounded grammar (any object) ends at once."""
    token_id = family.chat.tokenizer.convert_tokens_to_ids(token)
    assert token_id != family.chat.tokenizer.unk_token_id
    return ((token_id, bias),)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "seed": 3}, {"temperature": 0.7, "top_p": 0.9,
                                                                               "top_k": 50, "seed": 4}],
                         ids=["greedy", "t1", "top-p-k"])
async def test_answers_parse_validate_match_and_equal_a_choice(family, grammars, sampling):
    for strict in (False, True):
        answer = await run(family, grammars, schema(strict), **sampling)
        assert answer.finish.reason is FinishReason.STOP and answer.token_ids[-1] == family.stop_id
        jsonschema.validate(json.loads(answer.text), SCHEMA)
    answer = await run(family, grammars, REGEX, **sampling)
    assert answer.finish.reason is FinishReason.STOP and re.fullmatch(PATTERN, answer.text), answer.text
    answer = await run(family, grammars, CHOICE, **sampling)
    assert answer.finish.reason is FinishReason.STOP and answer.text in CHOICES, answer.text
    answer = await run(family, grammars, Constraint(ConstraintKind.JSON_OBJECT),
                       logit_bias=closer_bias(family, "}", 10.0), **sampling)
    assert answer.finish.reason is FinishReason.STOP and isinstance(json.loads(answer.text), dict), answer.text
    print(f"{family.name} {sampling}: last answer {answer.text!r}")


async def test_no_special_token_inside_and_the_turn_ends_only_where_the_grammar_accepts(family, grammars):
    """InternVL's special tokens and the end of turn lifted far above every other token: a free answer starts with
    one of them; a constrained one holds none and ends as soon as the grammar accepts, not before."""
    tokenizer = family.chat.tokenizer
    forced = [tokenizer.convert_tokens_to_ids(t) for t in ("<img>", "<IMG_CONTEXT>", "</img>", "<|im_start|>")]
    bias = tuple((token, 100.0) for token in [*forced, family.stop_id])
    [free] = await family.run(QUESTION, max_new_tokens=3, logit_bias=bias)
    assert free.token_ids[0] in {*forced, family.stop_id}
    answer = await run(family, grammars, REGEX, logit_bias=bias)
    assert re.fullmatch(PATTERN, answer.text), answer.text
    assert answer.token_ids[-1] == family.stop_id and answer.finish.reason is FinishReason.STOP
    shorter = [tokenizer.decode(answer.token_ids[:k]) for k in range(1, len(answer.token_ids) - 1)]
    assert not any(re.fullmatch(PATTERN, text) for text in shorter), shorter
    assert not set(answer.token_ids[:-1]) & set(tokenizer.added_tokens_decoder)
    answer = await run(family, grammars, schema(), logit_bias=bias)
    jsonschema.validate(json.loads(answer.text), SCHEMA)
    assert not set(answer.token_ids[:-1]) & set(tokenizer.added_tokens_decoder)


async def test_constrained_and_free_requests_batched_together_equal_their_solo_runs(family, grammars):
    requests = [
        constrained(family, grammars, None, max_new_tokens=40),
        constrained(family, grammars, schema(), temperature=1.0, seed=5),
        constrained(family, grammars, None, max_new_tokens=30, temperature=0.8, top_k=30, seed=6),
        constrained(family, grammars, REGEX),
        constrained(family, grammars, CHOICE, temperature=1.0, seed=7, logit_bias=((100, 5.0),)),
        constrained(family, grammars, schema(strict=True), presence_penalty=0.7),
    ]
    recorder = Recorder(family.engine)
    try:
        together = await asyncio.gather(*(family.collect(family.engine.submit(r)) for r in requests))
    finally:
        family.engine.observer = recorder.inner
    assert max(decode for decode, _ in recorder.steps) >= 4  # they did share steps
    for i, request in enumerate(requests):
        [alone] = await family.collect(family.engine.submit(request))
        assert together[i][0].token_ids == alone.token_ids, i
    jsonschema.validate(json.loads(together[1][0].text), SCHEMA)
    assert re.fullmatch(PATTERN, together[3][0].text) and together[4][0].text in CHOICES


@contextlib.asynccontextmanager
async def transformers_engine(family):
    """The transformers engine on the same checkpoint's language model (the project's reference path holds it)."""
    config = LLMConfig(model=str(family.path), dtype="float32", device="cpu", kv_budget_mb=64, kv_cache_budget_mb=0)
    engine = build_engine(config, family.chat.checkpoint, family.chat.tokenizer, family.prompts, 4096,
                          model=family.chat.language_model)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


async def test_greedy_constrained_answers_equal_the_transformers_engines(family, grammars):
    cases = [schema(), schema(strict=True), REGEX, CHOICE]
    async with transformers_engine(family) as ours:
        for constraint in cases:
            request = constrained(family, grammars, constraint)
            [theirs] = await family.collect(family.engine.submit(request))
            [expected] = await family.collect(ours.submit(request))
            assert theirs.token_ids == expected.token_ids, constraint.kind
            assert theirs.text == expected.text and theirs.finish.reason is expected.finish.reason


@contextlib.contextmanager
def service_on(family, monkeypatch, engine: str):
    """An LLMService of the family's checkpoint on `engine`: the vLLM one is the family's (already started), the
    transformers one computes with the reference path's model (not started: refusals come before the engine)."""
    config = LLMConfig(model=str(family.path), dtype="float32", device="cpu", kv_budget_mb=64, engine=engine,
                       max_context_tokens=4096)
    if engine == "vllm":
        monkeypatch.setitem(factory.ENGINES, "vllm", lambda inputs: family.engine)
        observer = family.engine.observer
        try:
            yield LLMService(config, family.chat.checkpoint, family.chat.tokenizer)
        finally:
            family.engine.observer = observer
    else:
        yield LLMService.with_model(config, family.chat.checkpoint, family.chat.language_model, family.chat.tokenizer)


@pytest.mark.parametrize("constraint", [
    Constraint(ConstraintKind.JSON_SCHEMA, schema='{"type": "nonsense"}'),
    Constraint(ConstraintKind.JSON_SCHEMA, schema='{"type": "integer", "minimum": 5, "maximum": 2}'),
    Constraint(ConstraintKind.REGEX, pattern="[0-9"),
    Constraint(ConstraintKind.REGEX, pattern="(?<=a)b"),
], ids=["type", "range", "unclosed", "lookbehind"])
async def test_refusals_are_the_transformers_engines(family, monkeypatch, constraint):
    request = GenerateRequest(QUESTION, SamplingParams(max_new_tokens=4, constraint=constraint))
    messages = []
    for engine in ("transformers", "vllm"):
        with service_on(family, monkeypatch, engine) as service, pytest.raises(InvalidArgumentError) as caught:
            await service.generate(request)
        messages.append(str(caught.value))
    assert messages[0] == messages[1] and messages[0].startswith(constraint.kind.value + ": ")


async def test_top_logprobs_with_a_constraint_is_refused_by_name(family, monkeypatch):
    """vLLM takes the log-probabilities after its grammar mask; the original reports the model's own."""
    request = GenerateRequest(QUESTION, SamplingParams(max_new_tokens=4, constraint=REGEX, top_logprobs=3))
    with service_on(family, monkeypatch, "vllm") as service, pytest.raises(InvalidArgumentError,
                                                                            match="top_logprobs with a constraint"):
        await service.generate(request)
