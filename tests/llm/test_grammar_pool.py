"""Grammar compiles in worker processes within --grammar-compile-timeout-s: an ordinary constraint compiles to the
grammar an in-process compile gives; a pathological one is refused at the budget, its worker killed, while an
ordinary compile sent alongside is answered."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from services.contract.constraint import Constraint, ConstraintKind
from services.contract.errors import InvalidArgumentError
from services.llm.grammar import Grammars
from services.llm.grammar_pool import GrammarPool
from services.model.checkpoint import open_checkpoint
from services.model.modules import load_tokenizer

pytestmark = [pytest.mark.asyncio, pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(120)]  # worker processes

# 27 KB of JSON schema that take xgrammar about 50 s (and 400 MB) to compile against the 151k-token vocabulary.
PATHOLOGICAL = Constraint(ConstraintKind.JSON_SCHEMA, schema=json.dumps(
    {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 30} for i in range(600)}}))
# One that takes milliseconds.
SMALL = Constraint(ConstraintKind.CHOICE, choices=("yes", "no"))
ORDINARY = Constraint(ConstraintKind.JSON_SCHEMA, schema=json.dumps(
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
     "required": ["name", "age"]}))


@pytest.fixture(scope="module")
def grammars(tiny_checkpoint):
    checkpoint = open_checkpoint(str(tiny_checkpoint()))
    tokenizer = load_tokenizer(checkpoint)
    return Grammars(tokenizer, checkpoint.spec.text_hf_config().vocab_size,
                    tokenizer.convert_tokens_to_ids("<|im_end|>"))


async def test_an_ordinary_constraint_compiles_as_in_process(grammars):
    pool = GrammarPool(grammars, timeout_s=60)
    try:
        compiled = await pool.compile(ORDINARY)
        assert str(compiled.grammar) == str(grammars.compile(ORDINARY).grammar)
        assert await pool.compile(ORDINARY) is compiled  # kept: a shared schema is compiled once
        with pytest.raises(InvalidArgumentError, match=r"^regex: "):
            await pool.compile(Constraint(ConstraintKind.REGEX, pattern="(unclosed"))
    finally:
        await pool.close()


async def test_an_overrunning_compile_is_refused_at_the_budget_and_others_are_answered(grammars):
    pool = GrammarPool(grammars, timeout_s=3.0)
    try:
        await pool.compile(Constraint(ConstraintKind.CHOICE, choices=("warm", "up")))  # the workers have started
        started = time.monotonic()
        slow = asyncio.ensure_future(pool.compile(PATHOLOGICAL))
        await asyncio.sleep(0.5)
        assert await pool.compile(SMALL) is not None  # on the other worker, while the pathological one runs
        assert not slow.done()
        with pytest.raises(InvalidArgumentError, match=r"^json_schema: the constraint took longer than 3 s to "
                                                       r"compile \(--grammar-compile-timeout-s\)"):
            await slow
        assert time.monotonic() - started < 20  # the budget, not the compile's 50 s (loose: a loaded machine)
        assert pool.timeouts == 1
        # The killed worker is replaced: two more compiles at once still go through.
        again = await asyncio.gather(pool.compile(Constraint(ConstraintKind.REGEX, pattern="[0-9]{3}")),
                                     pool.compile(Constraint(ConstraintKind.REGEX, pattern="[a-z]{2}")))
        assert all(again)
    finally:
        await pool.close()
