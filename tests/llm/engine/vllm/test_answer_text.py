"""One answer's text deltas (services.llm.engine.vllm.answer_text): their concatenation is the decoded answer, cut
before the first stop string, which is never sent; the end of turn adds no text."""

from __future__ import annotations

import pytest

from services.contract.finish import FinishReason
from services.llm.engine.vllm.answer_text import AnswerText
from services.model.checkpoint import open_checkpoint
from services.model.modules import load_tokenizer

STOP = 151645


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(open_checkpoint(tiny_checkpoint()))


def run(tokenizer, tokens, stops, ending):
    text = AnswerText(tokenizer, stops, STOP)
    deltas, reason = [], None
    for i, token in enumerate(tokens):
        delta, reason = text.add(token, ending if i == len(tokens) - 1 else None)
        deltas.append(delta)
        if reason is not None:
            return deltas, reason, i + 1
    return deltas, reason, len(tokens)


ANSWER = "Grüße: 世界 is the world; the stop word is BANANA here."


@pytest.mark.parametrize("ending", [FinishReason.LENGTH, FinishReason.STOP])
def test_without_a_stop_string_the_deltas_are_the_decoded_answer(tokenizer, ending):
    tokens = tokenizer.encode(ANSWER, add_special_tokens=False) + ([STOP] if ending is FinishReason.STOP else [])
    deltas, reason, used = run(tokenizer, tokens, (), ending)
    assert "".join(deltas) == tokenizer.decode(tokens, skip_special_tokens=True) == ANSWER
    assert (reason, used) == (ending, len(tokens))
    assert all("\ufffd" not in d for d in deltas)  # multi-byte characters are held until complete


def test_a_stop_string_cuts_the_answer_and_is_never_sent(tokenizer):
    tokens = tokenizer.encode(ANSWER, add_special_tokens=False)
    deltas, reason, used = run(tokenizer, tokens, ("BANANA", "never"), FinishReason.LENGTH)
    assert reason is FinishReason.STOP
    assert "".join(deltas) == ANSWER[:ANSWER.index("BANANA")]
    # It ended on the token that completed the stop string.
    assert "BANANA" in tokenizer.decode(tokens[:used]) and "BANANA" not in tokenizer.decode(tokens[:used - 1])


def test_text_held_back_as_a_possible_stop_string_is_sent_when_the_answer_ends(tokenizer):
    tokens = tokenizer.encode("It ends with BAN", add_special_tokens=False)
    deltas, reason, _ = run(tokenizer, tokens, ("BANANA",), FinishReason.LENGTH)
    assert "".join(deltas) == "It ends with BAN" and reason is FinishReason.LENGTH
    assert deltas[-1].endswith("BAN")  # held back as a possible "BANANA", sent with the last token
