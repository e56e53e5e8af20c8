"""The response models describe what `render` builds: every response, chunk and error body of a completion, with and
without logprobs, validates against its (closed) model; and a body with a key the models do not list does not."""

from __future__ import annotations

import asyncio

import pydantic
import pytest

from gateway.chat_response import Delta, Finish, TokenLogprob
from gateway.openai import responses
from gateway.openai.render import Completion, error_body
from services.contract.errors import InvalidMediaError, SessionBusyError
from services.contract.finish import FinishReason, Usage

USAGE = Usage(prompt_tokens=7, completion_tokens=2, cached_prompt_tokens=3, image_tiles=(1, 5), encoded_tiles=5,
              reused_tiles=1)
EVENTS = [Delta("a", (1,), (TokenLogprob(1, -0.5, ((1, -0.5), (9, -1.5))),)),
          Delta("bc", (2, 3), (TokenLogprob(2, -0.1, ((2, -0.1),)), TokenLogprob(3, -0.2, ((3, -0.2),))), index=1),
          Finish(FinishReason.LENGTH, USAGE, session_id="s1", index=1),
          Finish(FinishReason.CANCELLED, USAGE, session_id="s1")]


@pytest.mark.parametrize("top_logprobs", [None, 0, 2])
def test_what_render_builds_validates(top_logprobs):
    completion = Completion.start("m", top_logprobs)
    response = responses.ChatCompletion.model_validate(completion.response(EVENTS))
    assert [c.finish_reason for c in response.choices] == ["stop", "length"]
    chunks = [completion.role_chunk(0), *(completion.delta_chunk(e) for e in EVENTS[:2]),
              *(completion.finish_chunk(e) for e in EVENTS[2:]), completion.usage_chunk(list(EVENTS[2:]))]
    for chunk in chunks:
        responses.ChatCompletionChunk.model_validate(chunk)


@pytest.mark.parametrize("error", [InvalidMediaError("bad"), SessionBusyError("busy"), RuntimeError("boom"),
                                   asyncio.CancelledError()])
def test_error_bodies_validate(error):
    status, body = error_body(error)
    parsed = responses.ErrorResponse.model_validate(body)
    assert (parsed.error.type == "server_error") == (status >= 500)


def test_a_key_the_models_do_not_list_is_a_difference():
    body = Completion.start("m", None).response(EVENTS[2:])
    with pytest.raises(pydantic.ValidationError):
        responses.ChatCompletion.model_validate({**body, "system_fingerprint": "x"})
    body["choices"][0]["message"]["refusal"] = None
    with pytest.raises(pydantic.ValidationError):
        responses.ChatCompletion.model_validate(body)
