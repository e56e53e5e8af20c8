"""Choosing the next token of each sequence from its logits, and the top-k log-probabilities reported with it.

The order of the transforms is transformers' (`generate` with do_sample): repetition penalty, temperature, top-k,
top-p, then a multinomial draw. Greedy decoding applies only the penalty before the argmax. Every sampled sequence
draws from its own `torch.Generator`, so its output depends on its seed and inputs alone, never on its batch
neighbours. Reported log-probabilities are the raw log-softmax of the logits, before any transform.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.common.contract.sampling import SamplingParams


@dataclass(frozen=True)
class TopLogprobs:
    logprob: float
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]


class Sampler:
    """Per-sequence sampling state: the parameters, the seeded generator, the tokens seen so far (for the penalty)."""

    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device,
                 prompt_ids: torch.Tensor | None = None):
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator(device=device).manual_seed(seed)
        self.seen: torch.Tensor | None = None
        if params.penalty is not None:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            if prompt_ids is not None:
                self.seen[prompt_ids.to(device)] = True

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: can be decided for the whole batch at once."""
        return self.params.greedy and self.seen is None

    def observe(self, token_id: int) -> None:
        if self.seen is not None:
            self.seen[token_id] = True

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from one row of logits [vocab] (float32)."""
        if self.seen is not None:
            penalty = self.params.penalty
            logits = torch.where(self.seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
        if self.params.greedy:
            return int(torch.argmax(logits))
        logits = logits / self.params.temperature
        if self.params.top_k:
            k = min(self.params.top_k, logits.shape[-1])
            kth = torch.topk(logits, k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if 0 < self.params.top_p < 1:
            sorted_logits, order = torch.sort(logits, descending=False)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            remove = cumulative <= 1 - self.params.top_p
            remove[-1] = False  # keep at least the most likely token
            logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
        probs = logits.softmax(dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def sample_batch(logits: torch.Tensor, samplers: Sequence[Sampler]) -> tuple[list[int], list[TopLogprobs | None]]:
    """Next token and optional top log-probabilities for each row of `logits` [batch, vocab]."""
    logits = logits.float()
    tokens: list[int | None] = [None] * len(samplers)
    plain = [i for i, s in enumerate(samplers) if s.plain_greedy]
    if plain:
        for i, token in zip(plain, torch.argmax(logits[plain], dim=-1).tolist(), strict=True):
            tokens[i] = token
    for i, sampler in enumerate(samplers):
        if tokens[i] is None:
            tokens[i] = sampler.choose(logits[i])
        sampler.observe(tokens[i])
    wanted = [i for i, s in enumerate(samplers) if s.params.top_logprobs]
    reports: list[TopLogprobs | None] = [None] * len(samplers)
    if wanted:
        logprobs = torch.log_softmax(logits[wanted], dim=-1)
        k = max(samplers[i].params.top_logprobs for i in wanted)
        top = torch.topk(logprobs, k, dim=-1)
        chosen = logprobs.gather(1, torch.tensor([[tokens[i]] for i in wanted], device=logits.device))
        top_values, top_ids, chosen = top.values.tolist(), top.indices.tolist(), chosen[:, 0].tolist()
        for row, i in enumerate(wanted):
            n = samplers[i].params.top_logprobs
            reports[i] = TopLogprobs(chosen[row], tuple(top_ids[row][:n]), tuple(top_values[row][:n]))
    return [int(t) for t in tokens], reports
