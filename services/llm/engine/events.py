"""What goes into the engine (a request with its prompt, embeddings and sampling) and what comes out of it (token
deltas, then one finish with its usage); the events own their wire form (`internvl.llm.v1`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from internvl.llm.v1 import llm_pb2

from services.contract.conversation import ImageRef
from services.contract.errors import InvalidArgumentError
from services.contract.finish import FinishReason, Usage
from services.contract.priority import Priority
from services.contract.sampling import SamplingParams
from services.llm.prompt import Prompt


@dataclass(frozen=True)
class TopLogprobs:
    """The log-probability of the token sampled and the `top_logprobs` most likely tokens with theirs, most likely
    first (of the raw logits, before any sampling transform)."""

    logprob: float
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]


@dataclass(frozen=True)
class TokenDelta:
    """One generated token, the text it completes, and its log-probabilities when they were asked for."""

    token_ids: tuple[int, ...]
    text: str
    top_logprobs: tuple[TopLogprobs, ...] = ()
    index: int = 0  # the answer (0 to sampling.n - 1)

    def to_pb(self) -> llm_pb2.TokenDelta:
        return llm_pb2.TokenDelta(
            text=self.text, token_ids=self.token_ids, index=self.index,
            top_logprobs=[llm_pb2.TopLogprobs(logprob=t.logprob, token_ids=t.token_ids, logprobs=t.logprobs)
                          for t in self.top_logprobs])


@dataclass(frozen=True)
class Timing:
    """When (`time.monotonic()`) a request reached the service, was admitted to the batch, got its first token, and
    when this answer ended (None: it never got that far)."""

    arrival: float
    admitted: float | None
    first_token: float | None
    finished: float


@dataclass(frozen=True)
class Finish:
    """The end of one answer (`index`); its usage counts the prompt and that answer's tokens."""

    reason: FinishReason
    usage: Usage  # the token counts; the tile counts are the gateway's
    index: int = 0
    timing: Timing | None = None

    def to_pb(self) -> llm_pb2.GenerateFinish:
        return llm_pb2.GenerateFinish(reason=self.reason.to_pb(), usage=self.usage.to_pb(), index=self.index)


Event = TokenDelta | Finish


@dataclass(frozen=True)
class EngineRequest:
    prompt: Prompt
    sampling: SamplingParams
    # Already resolved against the server default and the room left in the context.
    max_new_tokens: int
    # The embeddings of each of the prompt's images, in `prompt.images` order: [tiles * tokens_per_tile, hidden] each.
    image_rows: tuple[torch.Tensor, ...] = ()
    # time.monotonic() after which the request is dropped; None: no deadline.
    deadline: float | None = None
    # time.monotonic() when the request reached the service (time to first token counts from here).
    arrival: float | None = None
    request_id: str = ""
    # The compiled grammar of `sampling.constraint` (an xgrammar CompiledGrammar, made by services.llm.grammar).
    grammar: object | None = None
    # The LoRA adapter the answer is computed with (a name of the engine's AdapterSlots); "" is the base model.
    adapter: str = ""
    # The prefix KV cache scope: KV is reused only between requests of the same salt ("" unsalted).
    cache_salt: str = ""
    # Waiting requests are admitted most important first (FIFO within a priority).
    priority: Priority = Priority.STANDARD


def check_image_rows(images: Sequence[ImageRef], rows: Sequence[torch.Tensor]) -> None:
    """Refuses image rows holding NaN or inf (they would make the request's logits NaN, or worse inside vLLM's engine
    core): InvalidArgumentError naming the image. A torch kernel: the engines call it on the thread that runs theirs."""
    for image, image_rows in zip(images, rows, strict=True):
        if not bool(torch.isfinite(image_rows).all()):
            raise InvalidArgumentError(f"embeddings of {image.key} contain NaN or infinite values")
