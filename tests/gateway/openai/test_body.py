"""Reading the body: strings that are not Unicode text (a lone surrogate escape) and bodies nested too deeply are
refused naming where, before anything else reads them."""

from __future__ import annotations

import json

import pytest

from gateway.openai.body import MAX_DEPTH, check_text
from services.contract.errors import InvalidArgumentError

SURROGATE_FIX = ", which is not a character: send Unicode text (a character beyond U+FFFF escaped as a surrogate pair)"


@pytest.mark.parametrize(("text", "where"), [
    ('{"messages": [{"role": "user", "content": "a\\ud800"}]}',
     "messages[0].content holds a lone UTF-16 surrogate (\\ud800)"),
    ('{"stop": ["ok", "\\udfff tail"]}', "stop[1] holds a lone UTF-16 surrogate (\\udfff)"),
    ('{"x": {"\\udc00": 1}}', "a key in x holds a lone UTF-16 surrogate (\\udc00)"),
    ('"\\ud83d"', "the body holds a lone UTF-16 surrogate (\\ud83d)"),
    ('{"a": "\\ude00\\ud83d"}', "a holds a lone UTF-16 surrogate (\\ude00)"),  # a pair in the wrong order
])
def test_lone_surrogates_refused_naming_where(text, where):
    with pytest.raises(InvalidArgumentError) as info:
        check_text(json.loads(text))
    assert str(info.value) == where + SURROGATE_FIX


def test_text_beyond_the_bmp_passes_escaped_or_not():
    body = json.loads('{"messages": [{"role": "user", "content": "\\ud83d\\ude00 é 😀 \\u0000"}]}')
    check_text(body)
    assert body["messages"][0]["content"] == "😀 é 😀 \x00"


def nested(depth: int) -> list:
    """`depth` levels of arrays and objects, alternating."""
    value: object = 1
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def test_nesting_up_to_the_limit():
    check_text(nested(MAX_DEPTH))
    with pytest.raises(InvalidArgumentError) as info:
        check_text(nested(MAX_DEPTH + 1))
    assert str(info.value) == "the body is nested deeper than 64 levels of arrays and objects"
    with pytest.raises(InvalidArgumentError):
        check_text({"response_format": {"json_schema": {"schema": nested(MAX_DEPTH)}}})
