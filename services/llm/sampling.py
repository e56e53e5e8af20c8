"""Choosing the next token of each sequence from its logits, and the top-k log-probabilities reported with it.

The order and the arithmetic of the transforms are transformers' (`generate` with do_sample): repetition penalty,
temperature, top-k, top-p, softmax, then a multinomial draw; greedy decoding applies only the penalty before the
argmax. The penalty counts generated tokens only, never the prompt: the original calls `generate(inputs_embeds=...)`,
where the `input_ids` its processors see hold only the generated tokens.

`sample_batch` applies each transform to all the rows that use it at once, with per-row parameters (a row with an
option off comes out of it unchanged), and reads the results back to the host once. Every sampled sequence still
draws from its own `torch.Generator`, one `torch.multinomial` per row, so that a seeded stream equals the original's
`torch.manual_seed(seed); generate(do_sample=True)` draw for draw and never depends on its batch neighbours.
Reported log-probabilities are the raw log-softmax of the logits, before any transform.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.common.contract.sampling import SamplingParams

# Columns of `Sampler.knobs`.
_PENALTY, _PENALTY_DIVISOR, _TEMPERATURE_DIVISOR, _TOP_P_FLOOR, _TOP_K_ON = range(5)


@dataclass(frozen=True)
class TopLogprobs:
    logprob: float
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]


class Sampler:
    """Per-sequence sampling state: the parameters, the seeded generator, the tokens generated so far (for the penalty).

    `knobs` [5] float32 and `kth` [] int64 hold the parameters on the device, made once here, so that a step stacks
    them for its rows without a host-to-device copy.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device):
        self.params = params
        self.top_k = min(params.top_k, vocab_size)  # transformers' "safety check"; 0: off
        self.uses_top_p = 0 < params.top_p < 1
        self.generator: torch.Generator | None = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator(device=device).manual_seed(seed)
        # seen [vocab] bool: the tokens this sequence generated (not its prompt).
        self.seen: torch.Tensor | None = None
        if params.penalty is not None:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=torch.device(device))
        penalty = params.penalty or 1.0
        temperature = params.temperature if not params.greedy else 1.0
        # Python's double `1 - top_p`, then float32: what comparing a float32 tensor with it does in transformers.
        # -1 (cumulative probabilities are >= 0) removes nothing.
        top_p_floor = 1 - params.top_p if self.uses_top_p else -1.0
        knobs = [penalty, _divisor(penalty, device), _divisor(temperature, device), top_p_floor, float(self.top_k > 0)]
        self.knobs = torch.tensor(knobs, dtype=torch.float32).to(device)
        self.kth = torch.tensor(max(self.top_k - 1, 0)).to(device)

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: decided for all such rows by one argmax."""
        return self.params.greedy and self.seen is None

    def observe(self, token: torch.Tensor) -> None:
        """Marks `token` ([1] int64, on the device) generated, without reading it back."""
        if self.seen is not None:
            self.seen.index_fill_(0, token, True)


def _reciprocal_division(device: torch.device | str) -> bool:
    # transformers divides by a Python float (`scores / temperature`, `score / penalty`); on CUDA PyTorch computes
    # a division by a CPU scalar as a multiplication by its float32 reciprocal, one bit apart from a true division.
    return torch.device(device).type == "cuda"


def _divisor(value: float, device: torch.device | str) -> float:
    """What dividing by `value` multiplies by where division by a scalar is a reciprocal product, else `value`."""
    if not _reciprocal_division(device):
        return value
    # The float32 reciprocal of float32(value), correctly rounded (a float32 quotient computed in double is).
    return 1.0 / float(torch.tensor(value, dtype=torch.float32))


def _divide(x: torch.Tensor, divisors: torch.Tensor) -> torch.Tensor:
    """x [rows, vocab] / divisors [rows, 1], rounded as transformers' division by each row's Python float."""
    return x * divisors if _reciprocal_division(x.device) else x / divisors


def _rows(x: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """x[rows] for ascending `rows` [n] of x [batch, ...], by views: no index tensor to copy to the device."""
    return x if len(rows) == x.shape[0] else torch.stack([x[i] for i in rows])


def _penalise(scores: torch.Tensor, samplers: Sequence[Sampler], knobs: torch.Tensor) -> torch.Tensor:
    """RepetitionPenaltyLogitsProcessor on scores [n, vocab]; rows without a penalty come out unchanged."""
    unseen: torch.Tensor | None = None  # [vocab] all False, shared by the rows without a penalty
    masks = []
    for sampler in samplers:
        if sampler.seen is None and unseen is None:
            unseen = torch.zeros_like(scores[0], dtype=torch.bool)
        masks.append(sampler.seen if sampler.seen is not None else unseen)
    penalised = torch.where(scores < 0, scores * knobs[:, _PENALTY, None],
                            _divide(scores, knobs[:, _PENALTY_DIVISOR, None]))
    return torch.where(torch.stack(masks), penalised, scores)


def _warp(scores: torch.Tensor, samplers: Sequence[Sampler], knobs: torch.Tensor) -> torch.Tensor:
    """Temperature, top-k and top-p on scores [n, vocab] of sampled rows (each skipped when no row uses it)."""
    owned = False  # whether `scores` is a tensor made here, which may be filled in place (it saves a [n, vocab] copy)
    if any(s.params.temperature != 1.0 for s in samplers):  # x / 1 == x: the rows at 1.0 are unchanged
        scores, owned = _divide(scores, knobs[:, _TEMPERATURE_DIVISOR, None]), True
    if any(s.top_k for s in samplers):
        # The k-th largest value of each row (any k-th below the largest k is exact: top-k values are elements).
        largest = torch.topk(scores, max(s.top_k for s in samplers), dim=-1).values
        kth = largest.gather(1, torch.stack([s.kth for s in samplers])[:, None])
        kth = torch.where(knobs[:, _TOP_K_ON, None] > 0, kth, float("-inf"))  # top_k off: remove nothing
        remove = scores < kth
        scores, owned = (scores.masked_fill_ if owned else scores.masked_fill)(remove, float("-inf")), True
    if any(s.uses_top_p for s in samplers):
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= knobs[:, _TOP_P_FLOOR, None]
        remove[:, -1] = False  # min_tokens_to_keep = 1: the most likely token stays
        remove = torch.empty_like(remove).scatter_(1, order, remove)  # back to vocabulary order
        scores = (scores.masked_fill_ if owned else scores.masked_fill)(remove, float("-inf"))
    return scores


def _choose(logits: torch.Tensor, samplers: Sequence[Sampler]) -> torch.Tensor:
    """The next token of each row of logits [batch, vocab] float32, as a [batch] int64 device tensor."""
    chosen: list[torch.Tensor | None] = [None] * len(samplers)
    if any(s.plain_greedy for s in samplers):
        argmax = torch.argmax(logits, dim=-1)  # over every row: cheaper than gathering the plain ones first
        for i, sampler in enumerate(samplers):
            if sampler.plain_greedy:
                chosen[i] = argmax[i:i + 1]
    work = [i for i, s in enumerate(samplers) if not s.plain_greedy]
    if work:
        working = [samplers[i] for i in work]
        knobs = torch.stack([s.knobs for s in working])  # [n, 5]
        scores = _rows(logits, work)
        if any(s.seen is not None for s in working):
            scores = _penalise(scores, working, knobs)
        if any(s.params.greedy for s in working):
            argmax = torch.argmax(scores, dim=-1)
            for row, (i, sampler) in enumerate(zip(work, working, strict=True)):
                if sampler.params.greedy:
                    chosen[i] = argmax[row:row + 1]
        sampled = [row for row, s in enumerate(working) if not s.params.greedy]
        if sampled:
            drawing = [working[row] for row in sampled]
            probs = _warp(_rows(scores, sampled), drawing, _rows(knobs, sampled)).softmax(dim=-1)
            for j, (row, sampler) in enumerate(zip(sampled, drawing, strict=True)):
                # Per row and with the row's generator, as generate's multinomial on that row alone.
                chosen[work[row]] = torch.multinomial(probs[j], 1, generator=sampler.generator)
    return torch.cat(chosen)


def sample_batch(logits: torch.Tensor, samplers: Sequence[Sampler]) -> tuple[list[int], list[TopLogprobs | None]]:
    """Next token and optional top log-probabilities for each row of `logits` [batch, vocab].

    Tokens and reports reach the host in one transfer, at the end.
    """
    logits = logits.float()
    tokens = _choose(logits, samplers)  # [batch]
    for row, sampler in enumerate(samplers):
        sampler.observe(tokens[row:row + 1])
    wanted = [i for i, s in enumerate(samplers) if s.params.top_logprobs]
    if not wanted:
        return tokens.tolist(), [None] * len(samplers)
    logprobs = torch.log_softmax(_rows(logits, wanted), dim=-1)  # [w, vocab]
    k = max(samplers[i].params.top_logprobs for i in wanted)
    top = torch.topk(logprobs, k, dim=-1)  # values, indices [w, k]
    chosen = logprobs.gather(1, _rows(tokens, wanted)[:, None])  # [w, 1]
    # One float64 transfer: token ids (below 2**53) and float32 log-probabilities are exact in it.
    host = torch.cat([tokens.double(), chosen[:, 0].double(), top.indices.double().flatten(),
                      top.values.double().flatten()]).tolist()
    batch, w = len(samplers), len(wanted)
    token_ids = [int(t) for t in host[:batch]]
    chosen_values = host[batch:batch + w]
    ids_at, values_at = batch + w, batch + w + w * k
    reports: list[TopLogprobs | None] = [None] * batch
    for row, i in enumerate(wanted):
        n = samplers[i].params.top_logprobs
        ids = tuple(int(t) for t in host[ids_at + row * k:ids_at + row * k + n])
        reports[i] = TopLogprobs(chosen_values[row], ids, tuple(host[values_at + row * k:values_at + row * k + n]))
    return token_ids, reports
