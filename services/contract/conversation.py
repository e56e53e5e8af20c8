"""A conversation with images by reference (cache keys), never pixels: what the gateway sends to the LLM service's
`Generate`, what a session stores between rounds, and what the LLM service renders into a prompt.

One type for all three, with its one wire form (`internvl.llm.v1.GenerateStart`'s conversation fields). Placement of
images in a turn's text (`<image>\\n`, `Image-1: ...`, `Frame1: ...`, explicit placeholders) is the LLM service's
prompt builder's job; the parts keep the caller's order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from internvl.llm.v1 import llm_pb2

from services.contract.errors import InvalidArgumentError
from services.contract.priority import Priority
from services.contract.sampling import SamplingParams


@dataclass(frozen=True)
class ImageRef:
    """The embeddings of `num_tiles` tiles (`num_tiles` * 256 rows) stored under `key`.

    `combined` is set only by the gateway, for the combined multi-image mode: the listed images' embeddings are
    concatenated under a synthetic `key` that exists only in the request (sent inline), so the LLM sees one image of
    all their tiles. On the wire a combined reference is a plain one.
    """

    key: str
    num_tiles: int
    combined: tuple[ImageRef, ...] = ()

    def leaves(self) -> tuple[ImageRef, ...]:
        """The cached images this reference stands for (itself, or the images it combines)."""
        return self.combined or (self,)

    def to_pb(self) -> llm_pb2.ImageRef:
        return llm_pb2.ImageRef(key=self.key, num_tiles=self.num_tiles)

    @classmethod
    def from_pb(cls, message: llm_pb2.ImageRef) -> ImageRef:
        return cls(message.key, message.num_tiles)


@dataclass(frozen=True)
class VideoRef:
    """A video's sampled frames in time order, each an image."""

    frames: tuple[ImageRef, ...]


# A piece of a user turn: text, an image, or a video.
Part = str | ImageRef | VideoRef


def part_images(parts: Iterable[Part]) -> list[ImageRef]:
    """The images of a part list in order; a video contributes its frames."""
    images: list[ImageRef] = []
    for part in parts:
        if isinstance(part, ImageRef):
            images.append(part)
        elif isinstance(part, VideoRef):
            images.extend(part.frames)
    return images


def parts_to_pb(parts: Sequence[Part]) -> list[llm_pb2.ContentPart]:
    out = []
    for part in parts:
        if isinstance(part, str):
            out.append(llm_pb2.ContentPart(text=part))
        elif isinstance(part, ImageRef):
            out.append(llm_pb2.ContentPart(image=part.to_pb()))
        else:
            out.append(llm_pb2.ContentPart(video=llm_pb2.VideoRef(frames=[f.to_pb() for f in part.frames])))
    return out


def parts_from_pb(messages: Iterable[llm_pb2.ContentPart], where: str) -> tuple[Part, ...]:
    """The parts of `messages`; one that sets none of text, image, video is INVALID_ARGUMENT naming `where[i]`."""
    parts: list[Part] = []
    for index, message in enumerate(messages):
        kind = message.WhichOneof("part")
        if kind == "text":
            parts.append(message.text)
        elif kind == "image":
            parts.append(ImageRef.from_pb(message.image))
        elif kind == "video":
            parts.append(VideoRef(tuple(ImageRef.from_pb(frame) for frame in message.video.frames)))
        else:
            raise InvalidArgumentError(f"{where}[{index}] sets none of text, image, video")
    return tuple(parts)


@dataclass(frozen=True)
class Turn:
    """One earlier round: the user's parts and the assistant's answer as text (re-tokenised with the prompt)."""

    user_parts: tuple[Part, ...]
    assistant_text: str


@dataclass(frozen=True)
class Conversation:
    """The conversation to continue, and the model (base or LoRA adapter) to continue it with."""

    user_parts: tuple[Part, ...]
    history: tuple[Turn, ...] = ()
    # None keeps the model's default system message; "" means none.
    system_message: str | None = None
    # A LoRA adapter's name (a model id the services list); "" is the base model.
    adapter: str = ""
    # The prefix KV cache scope (GenerateStart.cache_salt): KV is reused only between prompts of the same salt.
    # "" is the unsalted scope.
    cache_salt: str = ""

    def images(self) -> list[ImageRef]:
        """Every image in prompt order (history first), one entry per occurrence; a video contributes its frames."""
        return [image for parts in (*(t.user_parts for t in self.history), self.user_parts)
                for image in part_images(parts)]

    def prefix_identity(self) -> bytes:
        """What every turn of this conversation starts with: the system message and the first user turn (its text
        and its images' content keys). The LLM routing key: equal for all turns of a session, for a stateless caller
        that resends the history, on every gateway replica, and for identical first turns of different users (whose
        prompts then share that prefix too). The adapter is part of it: a prefix's KV is another under another
        adapter; so is the cache salt: KV of another salt is not reusable either."""
        first = self.history[0].user_parts if self.history else self.user_parts
        identity = [self.system_message, [_part_identity(p) for p in first], *([self.adapter] if self.adapter else []),
                    *([["salt", self.cache_salt]] if self.cache_salt else [])]
        return hashlib.sha256(json.dumps(identity, ensure_ascii=False).encode()).digest()

    @property
    def inline(self) -> bool:
        """Whether the embeddings must travel inline: some reference is a combined one, unknown to the cache."""
        return any(ref.combined for ref in self.images())


def _part_identity(part: Part) -> list:
    if isinstance(part, str):
        return ["text", part]
    if isinstance(part, ImageRef):
        return ["image", part.key]
    return ["video", [frame.key for frame in part.frames]]


@dataclass(frozen=True)
class GenerateRequest:
    """A `Generate` call's start: the conversation, how to sample its answer, and whether the embeddings come with
    the call (`inline_embeddings`) instead of from the shared cache."""

    conversation: Conversation
    sampling: SamplingParams = field(default_factory=SamplingParams)
    inline_embeddings: bool = False
    # The request's id for logs and traces (the call's `x-request-id` metadata wins over it).
    request_id: str = ""
    # The engine's waiting queue admits more important requests first; None: standard.
    priority: Priority | None = None

    def to_pb(self) -> llm_pb2.GenerateStart:
        conversation = self.conversation
        start = llm_pb2.GenerateStart(
            history=[llm_pb2.Turn(user_parts=parts_to_pb(t.user_parts), assistant_text=t.assistant_text)
                     for t in conversation.history],
            user_parts=parts_to_pb(conversation.user_parts), sampling=self.sampling.to_pb(),
            inline_embeddings=self.inline_embeddings, request_id=self.request_id, adapter=conversation.adapter,
            cache_salt=conversation.cache_salt, priority=self.priority.to_pb() if self.priority is not None else 0)
        if conversation.system_message is not None:
            start.system_message = conversation.system_message
        return start

    @classmethod
    def from_pb(cls, start: llm_pb2.GenerateStart) -> GenerateRequest:
        history = tuple(Turn(parts_from_pb(turn.user_parts, f"history[{n}].user_parts"), turn.assistant_text)
                        for n, turn in enumerate(start.history))
        conversation = Conversation(
            user_parts=parts_from_pb(start.user_parts, "user_parts"), history=history,
            system_message=start.system_message if start.HasField("system_message") else None,
            adapter=start.adapter, cache_salt=start.cache_salt)
        return cls(conversation, SamplingParams.from_pb(start.sampling), start.inline_embeddings, start.request_id,
                   Priority.from_pb(start.priority))
