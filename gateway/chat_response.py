"""What a chat answers: text deltas, the finish with its usage, the gathered result; and their translations from the
LLM service's messages and to the public proto."""

from __future__ import annotations

from dataclasses import dataclass

from internvl.gateway.v1 import gateway_pb2
from internvl.llm.v1 import llm_pb2

from services.contract.finish import FinishReason, Usage


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()

    def to_pb(self) -> gateway_pb2.TokenLogprobs:
        return gateway_pb2.TokenLogprobs(
            token_id=self.token_id, logprob=self.logprob,
            top=[gateway_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in self.top])


@dataclass(frozen=True)
class Delta:
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    index: int = 0  # the answer (0 to sampling.n - 1)

    @classmethod
    def from_pb(cls, message: llm_pb2.TokenDelta) -> Delta:
        logprobs = tuple(
            TokenLogprob(token_id, top.logprob, tuple(zip(top.token_ids, top.logprobs, strict=False)))
            for token_id, top in zip(message.token_ids, message.top_logprobs, strict=False))
        return cls(message.text, tuple(message.token_ids), logprobs, message.index)

    def to_pb(self) -> gateway_pb2.ChatResponse:
        return gateway_pb2.ChatResponse(delta=gateway_pb2.ChatDelta(
            text=self.text, token_ids=self.token_ids, logprobs=[lp.to_pb() for lp in self.logprobs],
            index=self.index))


@dataclass(frozen=True)
class Finish:
    """The end of answer `index`; its usage has the request's prompt counts and this answer's completion tokens."""

    reason: FinishReason
    usage: Usage
    session_id: str
    index: int = 0
    request_id: str = ""

    def to_pb(self) -> gateway_pb2.ChatResponse:
        return gateway_pb2.ChatResponse(finish=gateway_pb2.ChatFinish(
            reason=self.reason.to_pb(), usage=self.usage.to_pb(), session_id=self.session_id,
            index=self.index, request_id=self.request_id))


@dataclass(frozen=True)
class ChatResult:
    """A whole answer: the deltas of one Chat stream gathered, and its finish."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]
    finish: Finish

    @classmethod
    def gather(cls, deltas: list[Delta], finish: Finish) -> ChatResult:
        return cls("".join(d.text for d in deltas), tuple(t for d in deltas for t in d.token_ids),
                   tuple(lp for d in deltas for lp in d.logprobs), finish)

    def to_pb(self) -> gateway_pb2.ChatResult:
        return gateway_pb2.ChatResult(
            text=self.text, token_ids=self.token_ids, logprobs=[lp.to_pb() for lp in self.logprobs],
            finish_reason=self.finish.reason.to_pb(), usage=self.finish.usage.to_pb(),
            session_id=self.finish.session_id, request_id=self.finish.request_id)
