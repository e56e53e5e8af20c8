"""A chat completion as OpenAI's JSON: the whole response, the chunks of a stream, usage and logprobs, and the error
body. Transport-free: the handlers send what these build.

The gateway holds no tokenizer: a logprob entry's `token` is the text of its delta, and alternatives are named
`token_id:N`; every entry also carries `token_id`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass

from gateway.chat_response import Delta, Finish
from services.contract.errors import InternVLError, http_status, rpc_status
from services.runtime.request_metrics import RequestCall

log = logging.getLogger(__name__)
# OpenAI's finish_reason of each of ours.
FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}


def usage(finishes: list[Finish]) -> dict:
    """OpenAI's usage of n answers: the prompt once, the completion tokens of every answer summed."""
    u = dataclasses.replace(finishes[0].usage, completion_tokens=sum(f.usage.completion_tokens for f in finishes))
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens}, "internvl": u.as_dict()}


def logprobs(delta: Delta, top: int) -> list[dict]:
    """The logprob entries of a delta, each with up to `top` alternatives."""
    entries = []
    for lp in delta.logprobs:
        text = delta.text if len(delta.token_ids) == 1 else ""
        entries.append({"token": text, "token_id": lp.token_id, "logprob": lp.logprob,
                        "bytes": list(text.encode()),
                        "top_logprobs": [{"token": f"token_id:{t}", "token_id": t, "logprob": v, "bytes": None}
                                         for t, v in lp.top[:top]]})
    return entries


@dataclass(frozen=True)
class Completion:
    """What every response and chunk of one completion repeats, and how it reports logprobs (`top_logprobs`:
    alternatives per entry; None: no logprobs)."""

    id: str
    created: int
    model: str
    top_logprobs: int | None

    @classmethod
    def start(cls, model: str, top_logprobs: int | None) -> Completion:
        return cls("chatcmpl-" + uuid.uuid4().hex, int(time.time()), model, top_logprobs)

    def response(self, events: list[Delta | Finish]) -> dict:
        """The non-streaming response: the events of every answer gathered into `choices`."""
        finishes = sorted((e for e in events if isinstance(e, Finish)), key=lambda f: f.index)
        choices = []
        for finish in finishes:
            deltas = [e for e in events if isinstance(e, Delta) and e.index == finish.index]
            entries = ({"content": [e for d in deltas for e in logprobs(d, self.top_logprobs)]}
                       if self.top_logprobs is not None else None)
            choices.append({"index": finish.index,
                            "message": {"role": "assistant", "content": "".join(d.text for d in deltas)},
                            "finish_reason": FINISH[finish.reason.value], "logprobs": entries})
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage(finishes), "session_id": finishes[0].session_id}

    def _chunk(self, choices: list[dict]) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices}

    def role_chunk(self, index: int) -> dict:
        """The first chunk of answer `index`."""
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])

    def delta_chunk(self, delta: Delta) -> dict:
        choice = {"index": delta.index, "delta": {"content": delta.text}, "finish_reason": None}
        if self.top_logprobs is not None:
            choice["logprobs"] = {"content": logprobs(delta, self.top_logprobs)}
        return self._chunk([choice])

    def finish_chunk(self, finish: Finish) -> dict:
        return {**self._chunk([{"index": finish.index, "delta": {}, "finish_reason": FINISH[finish.reason.value]}]),
                "session_id": finish.session_id}

    def usage_chunk(self, finishes: list[Finish]) -> dict:
        """The last chunk when the caller asked for usage: no choices."""
        return {**self._chunk([]), "usage": usage(finishes)}


def error_body(exc: BaseException, call: RequestCall | None = None) -> tuple[int, dict]:
    """HTTP status and OpenAI error body (and the status `call` is counted under), both from the one error table;
    unexpected errors are logged with their traceback, never returned."""
    if not isinstance(exc, InternVLError):
        log.error("chat completion failed", exc_info=exc)
    status = rpc_status(exc).name
    if call is not None:
        call.code = status
    message = str(exc) if isinstance(exc, InternVLError) else "internal error"
    code = http_status(exc)
    kind = "invalid_request_error" if code < 500 else "server_error"
    return code, {"error": {"message": message, "type": kind, "param": None, "code": status.lower()}}
