"""n answers to one prompt (prefilled once, each its own seed) and constrained rows in the shared batch."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
from helpers.engine import Recorder, Result, ask

from services.contract.constraint import Constraint, ConstraintKind
from services.contract.errors import InvalidArgumentError
from services.llm.engine.events import TokenDelta

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]

SCHEMA = {"type": "object", "properties": {
    "colour": {"enum": ["red", "green", "blue"]},
    "count": {"type": "integer", "minimum": 0, "maximum": 99},
    "ok": {"type": "boolean"}}, "required": ["colour", "count", "ok"], "additionalProperties": False}


async def answers(stream) -> dict[int, Result]:
    """Every answer of a stream, by index."""
    out: dict[int, Result] = {}
    async for event in stream:
        result = out.setdefault(event.index, Result([], "", [], None))
        if isinstance(event, TokenDelta):
            result.token_ids += event.token_ids
            result.text += event.text
        else:
            result.finish = event
    return out


async def test_n_seeded_answers_equal_single_requests_with_the_derived_seeds(make_service, collect):
    sampling = {"temperature": 1.3, "top_p": 0.95, "max_new_tokens": 10}
    prompt = "Tell me a story about " + "a tiny model " * 12
    async with make_service(kv_cache_budget_mb=0) as service:
        recorder = Recorder(service.engine)
        singles = [await collect(await service.generate(ask(prompt, seed=seed, **sampling)))
                   for seed in (2**64 - 2, 2**64 - 1, 0)]
        single_prefill = sum(tokens for _, tokens in recorder.steps) / 3
        recorder.steps.clear()
        fed_before = service.metrics.prefill_tokens._value.get()
        got = await answers(await service.generate(ask(prompt, n=3, seed=2**64 - 2, **sampling)))
        fed = service.metrics.prefill_tokens._value.get() - fed_before
    # Answer i samples with seed + i (mod 2**64), as a single request with that seed.
    assert sorted(got) == [0, 1, 2]
    assert [got[i].token_ids for i in range(3)] == [s.token_ids for s in singles]
    assert [got[i].text for i in range(3)] == [s.text for s in singles]
    assert len({tuple(s.token_ids) for s in singles}) > 1, "the seeds should give different answers"
    # One prefill for the three answers: the prompt's tokens were fed once.
    assert sum(tokens for _, tokens in recorder.steps) == single_prefill == fed
    assert [got[i].finish.usage.prompt_tokens for i in range(3)] == [singles[0].finish.usage.prompt_tokens] * 3
    assert [got[i].finish.usage.completion_tokens for i in range(3)] == [len(s.token_ids) for s in singles]


async def test_n_answers_beside_other_requests_and_cancelled_together(make_service, collect):
    async with make_service(kv_cache_budget_mb=0, max_batch_size=4) as service:
        with pytest.raises(InvalidArgumentError, match="n = 5 answers exceed this LLM server's batch of 4"):
            await service.generate(ask("Hi", n=5, temperature=1.0))
        other = ask("Something else entirely", max_new_tokens=12)
        alone = await collect(await service.generate(other))
        group = ask("Hi there", n=3, temperature=1.0, seed=4, max_new_tokens=12)
        solo_group = await answers(await service.generate(group))
        together = await asyncio.gather(answers(await service.generate(group)),
                                        collect(await service.generate(other)))
        assert {i: r.token_ids for i, r in together[0].items()} == {i: r.token_ids for i, r in solo_group.items()}
        assert together[1].token_ids == alone.token_ids
        assert service.engine.max_batch_size_seen == 4

        stream = await service.generate(ask("Go on", n=3, temperature=1.0, max_new_tokens=200))
        await stream.__anext__()
        stream.cancel()
        reasons = sorted(r.finish.reason.value for r in (await answers(stream)).values())
        assert reasons == ["cancelled"] * 3
        assert service.engine.load().running == 0


async def test_constrained_and_free_rows_share_steps_and_equal_their_solo_runs(make_service, collect):
    schema = Constraint(ConstraintKind.JSON_SCHEMA, schema=json.dumps(SCHEMA), strict=True)
    choice = Constraint(ConstraintKind.CHOICE, choices=("yes", "no", "maybe \"so\""))
    requests = [ask("Describe the weather as JSON.", max_new_tokens=60, constraint=schema),
                ask("Free text, please.", max_new_tokens=20),
                ask("Yes or no?", max_new_tokens=20, constraint=choice, temperature=1.0, seed=3),
                ask("Sampled JSON.", max_new_tokens=60, constraint=schema, temperature=1.0, seed=9)]
    async with make_service(kv_cache_budget_mb=0) as service:
        solo = [await collect(await service.generate(r)) for r in requests]
        recorder = Recorder(service.engine)
        together = await asyncio.gather(*[collect(await service.generate(r)) for r in requests])
    assert [r.token_ids for r in together] == [r.token_ids for r in solo]
    assert max(decode for decode, _ in recorder.steps) == 4, "the four rows never decoded in one step"
    for result in (solo[0], solo[3]):
        assert result.reason == "stop", result.text
        jsonschema.validate(json.loads(result.text), SCHEMA)
    assert solo[2].text in choice.choices


async def test_an_invalid_schema_is_refused_before_anything_runs(make_service):
    async with make_service() as service:
        bad = Constraint(ConstraintKind.JSON_SCHEMA, schema=json.dumps({"type": "nonsense"}))
        with pytest.raises(InvalidArgumentError, match="json_schema: .*nonsense"):
            await service.generate(ask("Hi", constraint=bad))
        with pytest.raises(InvalidArgumentError, match="logit_bias: token id 999999 is outside the vocabulary"):
            await service.generate(ask("Hi", logit_bias=((999999, 1.0),)))
        assert service.engine.steps == 0
