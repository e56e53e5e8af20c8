"""A caller's chat request as the orchestrator works on it, and its one translation from the public proto.

The gRPC servicer builds it with `ChatRequest.from_pb`; the HTTP API builds the same dataclasses from JSON.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from internvl.gateway.v1 import gateway_pb2

from services.contract.errors import InvalidArgumentError
from services.contract.priority import Priority
from services.contract.sampling import SamplingParams
from services.contract.tiling import DEFAULT_MAX_NUM

DEFAULT_NUM_SEGMENTS = 8
DEFAULT_FRAME_MAX_NUM = 1


class MultiImageMode(enum.Enum):
    SEPARATE = "separate"
    COMBINED = "combined"


class ImageDetail(enum.Enum):
    """OpenAI's `detail`: LOW is one tile of the whole image (no thumbnail); AUTO and HIGH tile up to max_num."""

    AUTO = "auto"
    LOW = "low"
    HIGH = "high"

    @classmethod
    def from_pb(cls, value: int) -> ImageDetail:
        return {gateway_pb2.IMAGE_DETAIL_LOW: cls.LOW, gateway_pb2.IMAGE_DETAIL_HIGH: cls.HIGH}.get(value, cls.AUTO)

    def max_num(self, requested: int) -> int:
        """The tiles an image of this detail may be cut into when the request allows `requested`."""
        return 1 if self is ImageDetail.LOW else requested


@dataclass(frozen=True)
class ImageInput:
    """Exactly one of `data`, `path` (inside the media root) or `url` (a base64 `data:` URL, or an http(s) URL the
    gateway fetches by its allowlist before planning)."""

    data: bytes | None = None
    path: str | None = None
    url: str | None = None
    detail: ImageDetail = ImageDetail.AUTO

    @classmethod
    def from_pb(cls, pb: gateway_pb2.ImageInput, where: str = "image") -> ImageInput:
        which = pb.WhichOneof("source")
        if which is None:
            raise InvalidArgumentError(f"{where} (image) has no source: set data, path or url")
        return cls(**{which: getattr(pb, which)}, detail=ImageDetail.from_pb(pb.detail))


@dataclass(frozen=True)
class VideoInput:
    """Exactly one of `data`, `path` or `url` (as ImageInput's)."""

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
            raise InvalidArgumentError(f"{where} (video) has no source: set data, path or url")
        return cls(**{which: getattr(pb, which)},
                   num_segments=pb.num_segments if pb.HasField("num_segments") else DEFAULT_NUM_SEGMENTS,
                   bound=(pb.bound.start_s, pb.bound.end_s) if pb.HasField("bound") else None,
                   max_num=pb.max_num if pb.HasField("max_num") else DEFAULT_FRAME_MAX_NUM)


@dataclass(frozen=True)
class ContentPart:
    """One piece of a user turn: exactly one of text, image, video."""

    text: str | None = None
    image: ImageInput | None = None
    video: VideoInput | None = None

    @classmethod
    def from_pb(cls, pb: gateway_pb2.ContentPart, where: str = "part") -> ContentPart:
        which = pb.WhichOneof("part")
        if which == "text":
            return cls(text=pb.text)
        if which == "image":
            return cls(image=ImageInput.from_pb(pb.image, where))
        if which == "video":
            return cls(video=VideoInput.from_pb(pb.video, where))
        raise InvalidArgumentError(f"{where} is empty: set text, image or video")


@dataclass(frozen=True)
class CallerTurn:
    """An earlier round supplied by the caller."""

    user: tuple[ContentPart, ...]
    assistant_text: str


@dataclass(frozen=True)
class ChatRequest:
    content: tuple[ContentPart, ...]
    history: tuple[CallerTurn, ...] = ()
    session_id: str | None = None
    max_num: int = DEFAULT_MAX_NUM
    multi_image_mode: MultiImageMode = MultiImageMode.SEPARATE
    sampling: SamplingParams = field(default_factory=SamplingParams)
    system_message: str | None = None
    # Set by the API that received the request (the caller's, or a new one): see services.runtime.request_ids.
    request_id: str = ""
    # The OpenAI API's `user` / `safety_identifier`: recorded on the request's span as `user.id`.
    user: str = ""
    # The model id to answer with (the base's name or a LoRA adapter's); "": the base, or the session's model.
    model: str = ""
    # How much it matters under saturation (gRPC field or HTTP header); None: the tenant's or the gateway's default
    # (services.contract.priority.effective_priority).
    priority: Priority | None = None

    @classmethod
    def from_pb(cls, pb: gateway_pb2.ChatRequest) -> ChatRequest:
        mode = (MultiImageMode.COMBINED if pb.multi_image_mode == gateway_pb2.MULTI_IMAGE_MODE_COMBINED
                else MultiImageMode.SEPARATE)
        return cls(
            content=tuple(ContentPart.from_pb(p, f"content[{i}]") for i, p in enumerate(pb.content)),
            history=tuple(CallerTurn(tuple(ContentPart.from_pb(p, f"history[{n}].user_content[{i}]")
                                     for i, p in enumerate(t.user_content)), t.assistant_text)
                          for n, t in enumerate(pb.history)),
            session_id=pb.session_id if pb.HasField("session_id") else None,
            max_num=pb.max_num if pb.HasField("max_num") else DEFAULT_MAX_NUM,
            multi_image_mode=mode,
            sampling=SamplingParams.from_pb(pb.sampling),
            system_message=pb.system_message if pb.HasField("system_message") else None,
            request_id=pb.request_id,
            model=pb.model,
            priority=Priority.from_pb(pb.priority),
        )
