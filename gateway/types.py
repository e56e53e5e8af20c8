"""The gateway's domain objects and their one translation to and from the public proto.

The orchestrator works on these frozen dataclasses only; `from_pb` / `to_pb` here are the only place that reads or
builds `internvl.gateway.v1` messages (the gRPC servicer calls them, the HTTP API builds the dataclasses directly).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from internvl.gateway.v1 import gateway_pb2

from services.common.errors import InvalidArgumentError
from services.llm.sampling import SamplingParams

_INT32 = 1 << 31
DEFAULT_IMAGE_MAX_NUM = 12
DEFAULT_NUM_SEGMENTS = 8
DEFAULT_FRAME_MAX_NUM = 1


class MultiImageMode(enum.Enum):
    SEPARATE = "separate"
    COMBINED = "combined"


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"


# ------------------------------------------------------------------------------------------------ requests


@dataclass(frozen=True)
class ImageInput:
    """Exactly one of `data`, `path` (inside the media root) or `url` (a base64 `data:` URL)."""

    data: bytes | None = None
    path: str | None = None
    url: str | None = None

    @classmethod
    def from_pb(cls, pb: gateway_pb2.ImageInput, where: str = "image") -> ImageInput:
        which = pb.WhichOneof("source")
        if which is None:
            raise InvalidArgumentError(f"{where} (image) has no source: set data, path or url")
        return cls(**{which: getattr(pb, which)})


@dataclass(frozen=True)
class VideoInput:
    """Exactly one of `data`, `path` or `url` (a base64 `data:` URL; the HTTP API's only)."""

    data: bytes | None = None
    path: str | None = None
    url: str | None = None
    num_segments: int = DEFAULT_NUM_SEGMENTS
    bound: tuple[float, float] | None = None
    max_num: int = DEFAULT_FRAME_MAX_NUM

    @classmethod
    def from_pb(cls, pb: gateway_pb2.VideoInput, where: str = "video") -> VideoInput:
        which = pb.WhichOneof("source")
        if which is None:
            raise InvalidArgumentError(f"{where} (video) has no source: set data or path")
        return cls(**{which: getattr(pb, which)},
                   num_segments=pb.num_segments if pb.HasField("num_segments") else DEFAULT_NUM_SEGMENTS,
                   bound=(pb.bound.start_s, pb.bound.end_s) if pb.HasField("bound") else None,
                   max_num=pb.max_num if pb.HasField("max_num") else DEFAULT_FRAME_MAX_NUM)


@dataclass(frozen=True)
class Part:
    """One piece of a user turn: exactly one of text, image, video."""

    text: str | None = None
    image: ImageInput | None = None
    video: VideoInput | None = None

    @classmethod
    def from_pb(cls, pb: gateway_pb2.ContentPart, where: str = "part") -> Part:
        which = pb.WhichOneof("part")
        if which == "text":
            return cls(text=pb.text)
        if which == "image":
            return cls(image=ImageInput.from_pb(pb.image, where))
        if which == "video":
            return cls(video=VideoInput.from_pb(pb.video, where))
        raise InvalidArgumentError(f"{where} is empty: set text, image or video")


@dataclass(frozen=True)
class Turn:
    """An earlier round supplied by the caller."""

    user: tuple[Part, ...]
    assistant_text: str


class Sampling(SamplingParams):
    """The LLM service's sampling parameters as the gateway takes them from a caller."""

    def validate(self) -> None:
        """The LLM service's own checks, and the wire's integer ranges, before any media work is done."""
        for name in ("max_new_tokens", "top_k", "top_logprobs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not -_INT32 <= value < _INT32:
                raise InvalidArgumentError(f"{name} must be an integer below 2**31, got {value!r}")
        super().validate()

    @classmethod
    def from_pb(cls, pb: gateway_pb2.SamplingParams) -> Sampling:
        return cls(max_new_tokens=pb.max_new_tokens, temperature=pb.temperature, top_p=pb.top_p, top_k=pb.top_k,
                   repetition_penalty=pb.repetition_penalty, stop_strings=tuple(pb.stop_strings),
                   seed=pb.seed if pb.HasField("seed") else None, top_logprobs=pb.top_logprobs)


@dataclass(frozen=True)
class ChatRequest:
    content: tuple[Part, ...]
    history: tuple[Turn, ...] = ()
    session_id: str | None = None
    max_num: int = DEFAULT_IMAGE_MAX_NUM
    multi_image_mode: MultiImageMode = MultiImageMode.SEPARATE
    sampling: Sampling = field(default_factory=Sampling)
    system_message: str | None = None
    request_id: str = ""

    @classmethod
    def from_pb(cls, pb: gateway_pb2.ChatRequest) -> ChatRequest:
        mode = (MultiImageMode.COMBINED if pb.multi_image_mode == gateway_pb2.MULTI_IMAGE_MODE_COMBINED
                else MultiImageMode.SEPARATE)
        return cls(
            content=tuple(Part.from_pb(p, f"content[{i}]") for i, p in enumerate(pb.content)),
            history=tuple(Turn(tuple(Part.from_pb(p, f"history[{n}].user_content[{i}]")
                                     for i, p in enumerate(t.user_content)), t.assistant_text)
                          for n, t in enumerate(pb.history)),
            session_id=pb.session_id if pb.HasField("session_id") else None,
            max_num=pb.max_num if pb.HasField("max_num") else DEFAULT_IMAGE_MAX_NUM,
            multi_image_mode=mode,
            sampling=Sampling.from_pb(pb.sampling),
            system_message=pb.system_message if pb.HasField("system_message") else None,
            request_id=pb.request_id,
        )


# ----------------------------------------------------------------------------------------------- responses


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

    def to_pb(self) -> gateway_pb2.ChatResponse:
        return gateway_pb2.ChatResponse(delta=gateway_pb2.ChatDelta(
            text=self.text, token_ids=self.token_ids, logprobs=[lp.to_pb() for lp in self.logprobs]))


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    image_tiles: tuple[int, ...] = ()
    encoded_tiles: int = 0
    reused_tiles: int = 0

    def to_pb(self) -> gateway_pb2.Usage:
        return gateway_pb2.Usage(
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
            cached_prompt_tokens=self.cached_prompt_tokens, image_tiles=self.image_tiles,
            encoded_tiles=self.encoded_tiles, reused_tiles=self.reused_tiles)

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "cached_prompt_tokens": self.cached_prompt_tokens, "image_tiles": list(self.image_tiles),
                "encoded_tiles": self.encoded_tiles, "reused_tiles": self.reused_tiles}


_FINISH_PB = {
    FinishReason.STOP: gateway_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: gateway_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: gateway_pb2.FINISH_REASON_CANCELLED,
}


@dataclass(frozen=True)
class Finish:
    reason: FinishReason
    usage: Usage
    session_id: str

    def to_pb(self) -> gateway_pb2.ChatResponse:
        return gateway_pb2.ChatResponse(finish=gateway_pb2.ChatFinish(
            reason=_FINISH_PB[self.reason], usage=self.usage.to_pb(), session_id=self.session_id))


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
            finish_reason=_FINISH_PB[self.finish.reason], usage=self.finish.usage.to_pb(),
            session_id=self.finish.session_id)
