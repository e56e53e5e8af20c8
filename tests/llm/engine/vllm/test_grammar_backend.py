"""vLLM's xgrammar backend as the plugin makes it (services.llm.engine.vllm.grammar_backend), built as vLLM's
structured-output manager builds it and asked what vLLM asks: InternVL's added tokens are never allowed, and the end
of turn is the grammar's only stop token although vLLM passes the tokenizer's eos too."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import xgrammar
from vllm.v1.structured_output.backend_types import StructuredOutputOptions

from services.contract.constraint import Constraint, ConstraintKind
from services.llm.engine.vllm.grammar_backend import CheckpointXgrammarBackend
from services.llm.engine.vllm.plugin import TOKENIZER_MODE
from services.llm.grammar import constraint_ebnf
from services.model.checkpoint import open_checkpoint
from services.model.modules import load_tokenizer

VOCAB = 151674  # the tiny checkpoint's lm_head rows


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(open_checkpoint(tiny_checkpoint()))


def backend(tokenizer, mode: str) -> CheckpointXgrammarBackend:
    config = SimpleNamespace(model_config=SimpleNamespace(tokenizer_mode=mode, hf_config=SimpleNamespace(
        model_type="internvl_chat")), structured_outputs_config=SimpleNamespace(disable_any_whitespace=False),
        speculative_config=None)
    return CheckpointXgrammarBackend(config, tokenizer=tokenizer, vocab_size=VOCAB)


def allowed(grammar) -> torch.Tensor:
    """[VOCAB] bool: what the grammar's matcher allows next."""
    bitmask = xgrammar.allocate_token_bitmask(1, VOCAB)
    grammar.fill_bitmask(bitmask, 0)
    bits = np.unpackbits(bitmask[0].numpy().astype("<i4").view(np.uint8), bitorder="little")[:VOCAB]
    return torch.from_numpy(bits.astype(bool))


def test_added_tokens_never_and_the_end_of_turn_only_where_the_grammar_accepts(tokenizer):
    stop, eos = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ebnf = constraint_ebnf(Constraint(ConstraintKind.REGEX, pattern="[a-z ]+"))
    grammar = backend(tokenizer, TOKENIZER_MODE).compile_grammar(StructuredOutputOptions.GRAMMAR, ebnf,
                                                                  stop_token_ids={stop, eos})
    added = sorted(tokenizer.added_tokens_decoder)
    first = allowed(grammar)
    assert first.any() and not first[added].any() and not first[stop]
    assert grammar.accept_tokens("r", tokenizer.encode("hello", add_special_tokens=False))
    after = allowed(grammar)
    assert after[stop] and not after[eos]
    assert not after[[t for t in added if t != stop]].any()
    assert grammar.accept_tokens("r", [stop]) and grammar.is_terminated()


def test_another_tokenizer_mode_gets_vllms_own_backend(tokenizer):
    """vLLM's backend (from_huggingface's vocabulary): `<img>`'s literal text is allowed in an open string there."""
    ebnf = constraint_ebnf(Constraint(ConstraintKind.REGEX, pattern="[<>a-z]+"))
    grammar = backend(tokenizer, "hf").compile_grammar(StructuredOutputOptions.GRAMMAR, ebnf)
    assert allowed(grammar)[tokenizer.convert_tokens_to_ids("<img>")]
