"""Sampling parameters as every process takes them: their meaning, their limits and their one wire mapping.

The gateway validates them before any media work is done; the LLM service validates them again (it has other
callers) and samples with them (`services.llm.engine.sampling`). The public and the internal API carry the same
message, `internvl.common.v1.SamplingParams`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from internvl.common.v1 import common_pb2

from services.contract.constraint import Constraint, ConstraintLimits
from services.contract.errors import InvalidArgumentError

_INT32 = 1 << 31


def _limit(default: int, help: str) -> int:
    """A field that is also a flag of the services that hold a `SamplingLimits` (plain metadata: the contract is
    below the runtime's `flag()`)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class SamplingLimits:
    """How much one request's sampling parameters may ask for. Each field is a flag (`--max-n`, ...) of the gateway
    and of the LLM service, which both validate (the gateway before any media work, the LLM service before any model
    work); a refusal names the flag and the limit."""

    max_n: int = _limit(16, "most answers (n) one request may ask for (default %(default)s)")
    max_logit_bias: int = _limit(300, "most logit_bias entries per request (default %(default)s, OpenAI's)")
    max_stop_strings: int = _limit(16, "most stop strings per request (default %(default)s)")
    max_stop_string_chars: int = _limit(256, "most characters of one stop string (default %(default)s)")
    constraint: ConstraintLimits = field(default_factory=ConstraintLimits,
                                         metadata={"group": ConstraintLimits, "title": None, "build": None,
                                                   "defaults": {}})

    def problems(self) -> list[str]:
        """What is wrong with these limits, naming each flag (every one must be >= 1)."""
        out = [f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
               for name in ("max_n", "max_logit_bias", "max_stop_strings", "max_stop_string_chars")
               if getattr(self, name) < 1]
        return out + self.constraint.problems()


DEFAULT_LIMITS = SamplingLimits()


@dataclass(frozen=True)
class SamplingParams:
    """Zero values mean "off" or "the server's default" (as on the wire): empty params decode greedily."""

    max_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    repetition_penalty: float = 0.0
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # (token id, bias) pairs in ascending token order: a tuple keeps the parameters hashable and comparable.
    logit_bias: tuple[tuple[int, float], ...] = ()
    n: int = 0
    constraint: Constraint | None = None

    MAX_TOP_LOGPROBS = 20
    SEED_LIMIT = 1 << 64

    def validate(self, limits: SamplingLimits = DEFAULT_LIMITS) -> None:
        """Refuses what no server can honour, naming the field: the wire's integer ranges, then each option's; and
        what is above `limits`, naming the field, the limit and its flag."""
        for name in ("max_new_tokens", "top_k", "top_logprobs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not -_INT32 <= value < _INT32:
                raise InvalidArgumentError(f"{name} must be an integer below 2**31, got {value!r}")
        if self.max_new_tokens < 0:
            raise InvalidArgumentError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not 0 <= self.temperature < math.inf:  # also rejects NaN
            raise InvalidArgumentError(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise InvalidArgumentError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgumentError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0 <= self.repetition_penalty < math.inf:
            raise InvalidArgumentError(f"repetition_penalty must be a finite number >= 0 (0 or 1: off), got "
                                       f"{self.repetition_penalty}")
        if not 0 <= self.top_logprobs <= self.MAX_TOP_LOGPROBS:
            raise InvalidArgumentError(f"top_logprobs must be in [0, {self.MAX_TOP_LOGPROBS}], got "
                                       f"{self.top_logprobs}")
        if self.seed is not None and not 0 <= self.seed < self.SEED_LIMIT:
            raise InvalidArgumentError(f"seed must be in [0, 2**64), got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise InvalidArgumentError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if len(self.logit_bias) > limits.max_logit_bias:
            raise InvalidArgumentError(f"logit_bias may have at most {limits.max_logit_bias} entries "
                                       f"(--max-logit-bias), got {len(self.logit_bias)}")
        for token, bias in self.logit_bias:
            if not 0 <= token < _INT32:
                raise InvalidArgumentError(f"logit_bias: token id {token} is not a token id")
            if not -100 <= bias <= 100:
                raise InvalidArgumentError(f"logit_bias[{token}] must be in [-100, 100], got {bias}")
        if not 0 <= self.n <= limits.max_n:
            raise InvalidArgumentError(f"n must be between 1 and {limits.max_n} (--max-n), got {self.n}")
        if self.constraint is not None:
            self.constraint.validate(limits.constraint)
        if len(self.stop_strings) > limits.max_stop_strings:
            raise InvalidArgumentError(f"at most {limits.max_stop_strings} stop strings (--max-stop-strings), got "
                                       f"{len(self.stop_strings)}")
        if any(not s for s in self.stop_strings):
            raise InvalidArgumentError("stop_strings must not contain an empty string")
        longest = max(map(len, self.stop_strings), default=0)
        if longest > limits.max_stop_string_chars:
            raise InvalidArgumentError(f"each stop string may have at most {limits.max_stop_string_chars} characters "
                                       f"(--max-stop-string-chars), got {longest}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalty(self) -> float | None:
        """The repetition penalty in effect, or None when off (0 or 1)."""
        return None if self.repetition_penalty in (0.0, 1.0) else self.repetition_penalty

    @property
    def answers(self) -> int:
        """How many answers are asked for (n; 0 on the wire means one)."""
        return max(self.n, 1)

    def for_answer(self, index: int) -> SamplingParams:
        """The parameters answer `index` of n samples with, alone: n = 1, and a set seed advanced by `index`
        (mod 2**64), so answer i equals a single request with seed + i."""
        seed = None if self.seed is None else (self.seed + index) % self.SEED_LIMIT
        return dataclasses.replace(self, n=0, seed=seed)

    @classmethod
    def from_pb(cls, message: common_pb2.SamplingParams) -> SamplingParams:
        """Unset `seed`: a random one."""
        return cls(max_new_tokens=message.max_new_tokens, temperature=message.temperature, top_p=message.top_p,
                   top_k=message.top_k, repetition_penalty=message.repetition_penalty,
                   stop_strings=tuple(message.stop_strings), seed=message.seed if message.HasField("seed") else None,
                   top_logprobs=message.top_logprobs, presence_penalty=message.presence_penalty,
                   frequency_penalty=message.frequency_penalty, logit_bias=tuple(sorted(message.logit_bias.items())),
                   n=message.n, constraint=Constraint.from_pb(message.constraint))

    def to_pb(self) -> common_pb2.SamplingParams:
        return common_pb2.SamplingParams(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            repetition_penalty=self.repetition_penalty, stop_strings=list(self.stop_strings), seed=self.seed,
            top_logprobs=self.top_logprobs, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, logit_bias=dict(self.logit_bias), n=self.n,
            constraint=self.constraint.to_pb() if self.constraint is not None else None)
