"""Choosing the next token of each sequence from its logits, and the top-k log-probabilities reported with it.

The transforms, in this order, each only for the rows that ask for it:

1. the repetition penalty (transformers' RepetitionPenaltyLogitsProcessor);
2. OpenAI's frequency and presence penalties: logit[j] -= count[j] * frequency_penalty + (count[j] > 0) *
   presence_penalty, count[j] being how many times the sequence generated token j, in float32;
3. logit_bias, added;
4. the grammar's mask (`services.llm.grammar`): -inf for every token the row's constraint does not allow next;
5. greedy rows: the argmax; sampled rows: temperature, top-k, top-p, softmax, then a multinomial draw.

Steps 1 and 5 are transformers' (`generate` with do_sample), order and arithmetic. The penalties count generated
tokens only, never the prompt: the original calls `generate(inputs_embeds=...)`, where the `input_ids` its processors
see hold only the generated tokens; OpenAI's penalties are counted over the generated tokens as well.

`sample_batch` applies each transform to all the rows that use it at once, with per-row parameters (a row with an
option off comes out of it unchanged), and reads the results back to the host once. Every sampled sequence still
draws from its own `torch.Generator`, one `torch.multinomial` per row, so that a seeded stream equals the original's
`torch.manual_seed(seed); generate(do_sample=True)` draw for draw and never depends on its batch neighbours.
Reported log-probabilities are the raw log-softmax of the logits, before any transform.

A constrained row's matcher accepts its token after the one transfer to the host. A failing call (a refused token,
which the mask should make impossible, or a torch error) changes no sampler's state but its generator's, so that the
engine may retry its rows one by one.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch
import xgrammar

from services.contract.errors import InvalidArgumentError
from services.contract.sampling import SamplingParams
from services.llm.engine.events import TopLogprobs

# Columns of `Sampler.knobs`.
_PENALTY, _PENALTY_DIVISOR, _TEMPERATURE_DIVISOR, _TOP_P_FLOOR, _TOP_K_ON, _FREQUENCY, _PRESENCE = range(7)


class Sampler:
    """Per-sequence sampling state: the parameters, the seeded generator, the tokens generated so far (for the
    penalties), the logit bias and the grammar matcher.

    `knobs` [7] float32 and `kth` [] int64 hold the parameters on the device, made once here, so that a step stacks
    them for its rows without a host-to-device copy. `grammar` is the compiled constraint of `params.constraint`
    (`services.llm.grammar.Grammars.compile`), compiled for the same `vocab_size`.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device | str, *,
                 grammar: xgrammar.CompiledGrammar | None = None):
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
        # counts [vocab] float32: how many times this sequence generated each token (exact up to 2**24).
        self.counts: torch.Tensor | None = None
        self._one: torch.Tensor | None = None  # [1] float32 1.0: what `observe` adds, without a host-to-device copy
        if params.frequency_penalty or params.presence_penalty:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=torch.device(device))
            self._one = torch.ones(1, dtype=torch.float32, device=torch.device(device))
        # bias [vocab] float32: logit_bias, dense.
        self.bias: torch.Tensor | None = None
        if params.logit_bias:
            self.bias = _dense_bias(params.logit_bias, vocab_size).to(device)
        self.matcher: xgrammar.GrammarMatcher | None = None
        if grammar is not None:
            if grammar.tokenizer_info.vocab_size != vocab_size:
                raise ValueError(f"the grammar was compiled for {grammar.tokenizer_info.vocab_size} tokens, the "
                                 f"logits have {vocab_size}")
            self.matcher = xgrammar.GrammarMatcher(grammar)
        elif params.constraint is not None:
            # Sampling it unconstrained would answer without saying so.
            raise ValueError(f"a {params.constraint.kind.value} constraint needs its compiled grammar")
        penalty = params.penalty or 1.0
        temperature = params.temperature if not params.greedy else 1.0
        # Python's double `1 - top_p`, then float32: what comparing a float32 tensor with it does in transformers.
        # -1 (cumulative probabilities are >= 0) removes nothing.
        top_p_floor = 1 - params.top_p if self.uses_top_p else -1.0
        knobs = [penalty, _divisor(penalty, device), _divisor(temperature, device), top_p_floor, float(self.top_k > 0),
                 params.frequency_penalty, params.presence_penalty]
        self.knobs = torch.tensor(knobs, dtype=torch.float32).to(device)
        self.kth = torch.tensor(max(self.top_k - 1, 0)).to(device)

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: decided for all such rows by one argmax."""
        return (self.params.greedy and self.seen is None and self.counts is None and self.bias is None
                and self.matcher is None)

    @property
    def constrained(self) -> bool:
        """Whether a grammar masks this sequence's tokens."""
        return self.matcher is not None

    @property
    def grammar_done(self) -> bool:
        """Whether the grammar accepted the stop token: the answer is complete, nothing more may be sampled."""
        return self.matcher is not None and self.matcher.is_terminated()

    def observe(self, token: torch.Tensor) -> None:
        """Marks `token` ([1] int64, on the device) generated, without reading it back."""
        if self.seen is not None:
            self.seen.index_fill_(0, token, True)
        if self.counts is not None:
            self.counts.index_add_(0, token, self._one)


def _dense_bias(logit_bias: Sequence[tuple[int, float]], vocab_size: int) -> torch.Tensor:
    """[vocab_size] float32 of the (token id, bias) pairs, 0 elsewhere; an id outside the vocabulary is refused."""
    bias = torch.zeros(vocab_size, dtype=torch.float32)
    for token, value in logit_bias:
        if not 0 <= token < vocab_size:
            raise InvalidArgumentError(f"logit_bias: token id {token} is not in the vocabulary ({vocab_size} tokens, "
                                       f"ids 0 to {vocab_size - 1})")
        bias[token] = value
    return bias


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


def _penalise_counts(scores: torch.Tensor, samplers: Sequence[Sampler], knobs: torch.Tensor) -> torch.Tensor:
    """OpenAI's frequency and presence penalties on scores [n, vocab], in float32.

    A row without them subtracts count 0 times penalty 0: +0.0, and x - (+0.0) is x for every float x (-0.0 and the
    infinities included), so it comes out unchanged bit for bit.
    """
    zeros: torch.Tensor | None = None  # [vocab] 0, shared by the rows without penalties
    counts = []
    for sampler in samplers:
        if sampler.counts is None and zeros is None:
            zeros = torch.zeros_like(scores[0])
        counts.append(sampler.counts if sampler.counts is not None else zeros)
    count = torch.stack(counts)  # [n, vocab]
    return scores - (count * knobs[:, _FREQUENCY, None] + (count > 0) * knobs[:, _PRESENCE, None])


def _add_bias(scores: torch.Tensor, samplers: Sequence[Sampler]) -> torch.Tensor:
    """scores [n, vocab] + each row's logit bias.

    A row without one adds -0.0: x + (-0.0) is x for every float x (+0.0 included, which + 0.0 would not keep for
    -0.0), so it comes out unchanged bit for bit.
    """
    neutral: torch.Tensor | None = None
    biases = []
    for sampler in samplers:
        if sampler.bias is None and neutral is None:
            neutral = torch.full_like(scores[0], -0.0)
        biases.append(sampler.bias if sampler.bias is not None else neutral)
    return scores + torch.stack(biases)


def _mask(scores: torch.Tensor, samplers: Sequence[Sampler]) -> torch.Tensor:
    """scores [n, vocab] with -inf for the tokens each constrained row's grammar does not allow next.

    The matchers fill a bitmask [c, ceil(vocab / 32)] int32 on the host (bit j % 32 of word j // 32: token j
    allowed), copied to the device without waiting for it (pinned memory) and unpacked there. Unconstrained rows
    come out unchanged.
    """
    rows = [row for row, s in enumerate(samplers) if s.matcher is not None]
    vocab = scores.shape[1]
    bitmask = torch.empty(xgrammar.get_bitmask_shape(len(rows), vocab), dtype=xgrammar.bitmask_dtype,
                          pin_memory=scores.is_cuda)
    for k, row in enumerate(rows):
        if samplers[row].grammar_done:
            raise RuntimeError("the grammar already accepted the stop token: the sequence should have ended")
        samplers[row].matcher.fill_next_token_bitmask(bitmask, k)  # writes the whole row k
    words = bitmask.to(scores.device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=scores.device)
    allowed = ((words[:, :, None] >> shifts) & 1).flatten(1)[:, :vocab].bool()  # [c, vocab]
    masked = _rows(scores, rows).masked_fill(~allowed, float("-inf"))
    if len(rows) == len(samplers):
        return masked
    at = {row: k for k, row in enumerate(rows)}
    return torch.stack([masked[at[row]] if row in at else scores[row] for row in range(len(samplers))])


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
        knobs = torch.stack([s.knobs for s in working])  # [n, 7]
        scores = _rows(logits, work)
        if any(s.seen is not None for s in working):
            scores = _penalise(scores, working, knobs)
        if any(s.counts is not None for s in working):
            scores = _penalise_counts(scores, working, knobs)
        if any(s.bias is not None for s in working):
            scores = _add_bias(scores, working)
        if any(s.matcher is not None for s in working):
            scores = _mask(scores, working)
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
    token_ids, reports = _read_back(logits, tokens, samplers)
    _accept(token_ids, samplers)
    # After the acceptance, which may fail: a failed call leaves the counts unchanged. No host sync: `tokens` is
    # still the device tensor.
    for row, sampler in enumerate(samplers):
        sampler.observe(tokens[row:row + 1])
    return token_ids, reports


def _accept(token_ids: list[int], samplers: Sequence[Sampler]) -> None:
    """Advances each constrained row's matcher by its token; all or none of them.

    The mask allows only what the matcher accepts, so a refusal is a bug. It raises for the whole call, the
    matchers that had accepted rolled back: the engine then samples the rows one by one, and only the row at fault
    fails.
    """
    accepted: list[Sampler] = []
    for row, sampler in enumerate(samplers):
        if sampler.matcher is None:
            continue
        if not sampler.matcher.accept_token(token_ids[row]):
            for done in accepted:
                done.matcher.rollback(1)
            raise RuntimeError(f"the grammar refused token {token_ids[row]} of row {row}, which its mask allowed")
        accepted.append(sampler)


def _read_back(logits: torch.Tensor, tokens: torch.Tensor, samplers: Sequence[Sampler]
               ) -> tuple[list[int], list[TopLogprobs | None]]:
    """The tokens [batch] and the wanted top log-probabilities of logits [batch, vocab], in one transfer."""
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
