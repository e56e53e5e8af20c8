"""The contract between the transformers engine's scheduler and its model runner: what one step is.

The scheduler (`services.llm.engine.scheduler`, on the event loop's thread) decides; the model runner
(`services.llm.engine.runner`, whose `step` runs in the engine's worker thread) computes. They share no mutable
state: sequences are named by integer ids the scheduler allocates, one per answer, and a prompt being prefilled is
named by its first answer's id. The exchange:

1. at admission (event loop's thread, between steps) the scheduler hands the runner each admitted request as a
   `NewPrompt`; the runner answers how many of its leading positions the prefix cache already holds, where its
   first chunk starts;
2. each step the scheduler hands the runner a `StepPlan`: the rows to drop, the rows to decode (every other row of
   the batch), the prompt chunks to prefill. The runner runs it (one decode forward, one prefill forward, one sampling
   call) and returns a `StepResult`: a token for each row that got one, the failures, the KV memory held after it;
3. the scheduler turns the tokens into text and events, and plans the next step.

A prompt whose last chunk was prefilled *forks*: its KV is copied into one batch row per answer and its last logits
are sampled once per answer (each with its own sampler), so all of a request's answers get their first token in the
step that completes its prompt, and then decode as independent rows.

The runner ends a row itself when it samples the stop token or reaches its length limit (`Sampled.ended`): the row
leaves the batch in that same step, its KV offered to the prefix cache. A row a stop string ended, or whose caller is
gone, is ended by the scheduler, and leaves at the start of the next step (`StepPlan.leaving`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from services.contract.finish import FinishReason
from services.llm.engine.api import BatchFaultError, StepReport
from services.llm.engine.events import EngineRequest, TopLogprobs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewPrompt:
    """An admitted request, as the runner needs it (`ModelRunner.admit`)."""

    # The sequence id of each answer, answer i sampling with `request.sampling.for_answer(i)`; answers[0] also
    # names the prompt in `Chunk.prompt` and, when its prefill fails, in `StepResult.failed`.
    answers: tuple[int, ...]
    # The request as submitted: prompt token ids, image rows ([tiles * tokens_per_tile, hidden] each, in
    # `prompt.images` order), adapter, grammar, max_new_tokens.
    request: EngineRequest

    @property
    def id(self) -> int:
        return self.answers[0]


@dataclass(frozen=True)
class Leave:
    """A row the scheduler ended (a stop string, a cancel, a deadline): it leaves the batch before the decode."""

    id: int
    # Offer its KV to the prefix cache (a stop string ended it: the turn is complete) or drop it (cancelled).
    remember: bool


@dataclass(frozen=True)
class Chunk:
    """The next chunk of a prompt being prefilled: positions [where the last chunk ended, `end`)."""

    prompt: int  # the prompt's id (NewPrompt.id)
    end: int  # the prompt position the chunk ends at; `len(prompt)` completes the prompt, which then forks


@dataclass(frozen=True)
class StepPlan:
    """What one step runs, decided by the scheduler."""

    leaving: tuple[Leave, ...] = ()
    # The rows of the one decode forward: every row of the batch but `leaving` (the runner checks it). One token each.
    decode: frozenset[int] = frozenset()
    # The chunks of the one prefill forward, in admission order (each its own row of the forward).
    prefill: tuple[Chunk, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.leaving or self.decode or self.prefill)


@dataclass(frozen=True)
class Sampled:
    """The token one row got this step."""

    id: int  # the answer's sequence id
    token: int
    logprobs: TopLogprobs | None  # when its sampling asks for top_logprobs
    # Set when the runner ended the row with this token: STOP (the stop token) or LENGTH (max_new_tokens, or the
    # context's end). The row has left the batch already. None: it decodes on (unless the scheduler ends it).
    ended: FinishReason | None = None


@dataclass
class StepResult:
    """What one step computed, returned by the runner."""

    # One per row that got a token: the decode rows in batch order, then the answers of each prompt completed.
    sampled: list[Sampled] = field(default_factory=list)
    # (id, the error its caller gets): a row (an answer) that failed alone and left the batch, or a prompt (its
    # NewPrompt.id, before it forked) whose prefill failed: all its answers fail, and the runner forgot it.
    failed: list[tuple[int, BaseException]] = field(default_factory=list)
    # Prompts (NewPrompt.id) whose last chunk was prefilled this step: they forked, and their answers joined the batch
    # but those ended or failed. A prompt not here whose chunk ran and is not in `failed` advanced to its chunk's end.
    completed: list[int] = field(default_factory=list)
    report: StepReport = field(default_factory=lambda: StepReport(0, 0, 0))
    kv_bytes: int = 0  # memory the batch's KV buffers hold after the step


def batch_fault(exc: BaseException, rows: int) -> BatchFaultError:
    """What the requests of a batch whose shared state a fault left suspect are told (the batch, `rows` sequences,
    is dropped and rebuilt)."""
    log.error("dropping the decode batch of %d sequences after %s: %s", rows, type(exc).__name__, exc)
    return BatchFaultError(f"the LLM server's batch failed ({type(exc).__name__}) and was rebuilt; retry the request")
