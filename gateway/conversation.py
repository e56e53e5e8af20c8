"""A conversation as the LLM service sees it: text, and images by reference (cache keys), never pixels.

This is what the gateway sends to `Generate` and what a session stores between rounds. Placement of images in a
turn's text (`<image>\\n`, `Image-1: ...`, `Frame1: ...`, explicit placeholders) is the LLM service's prompt
builder's job; the gateway keeps the parts in the caller's order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class ImageRef:
    """Embeddings of `num_tiles` tiles stored under `key`.

    `combined` is set for the combined multi-image mode: the listed images' embeddings are concatenated under a
    synthetic `key` that exists only in the request (sent inline), so the LLM sees one image of all their tiles.
    """

    key: str
    num_tiles: int
    combined: tuple[ImageRef, ...] = ()

    def leaves(self) -> tuple[ImageRef, ...]:
        """The cached images this reference stands for (itself, or the images it combines)."""
        return self.combined or (self,)


@dataclass(frozen=True)
class VideoRef:
    frames: tuple[ImageRef, ...]


RefPart = str | ImageRef | VideoRef


@dataclass(frozen=True)
class TurnRecord:
    user_parts: tuple[RefPart, ...]
    assistant_text: str


@dataclass(frozen=True)
class LLMConversation:
    user_parts: tuple[RefPart, ...]
    history: tuple[TurnRecord, ...] = ()
    # None keeps the model's default system message; "" means none.
    system_message: str | None = None
    # The LoRA adapter to answer with; "" is the base.
    adapter: str = ""

    def refs(self) -> list[ImageRef]:
        """Every image reference in prompt order (history first); a video contributes its frames."""
        return [ref for parts in (*(t.user_parts for t in self.history), self.user_parts) for ref in part_refs(parts)]

    def prefix_identity(self) -> bytes:
        """What every turn of this conversation starts with: the system message and the first user turn (its text
        and its images' content keys). The LLM routing key: equal for all turns of a session, for a stateless caller
        that resends the history, on every gateway replica, and for identical first turns of different users (whose
        prompts then share that prefix too). The adapter is part of it: a prefix's KV is another under another
        adapter."""
        first = self.history[0].user_parts if self.history else self.user_parts
        identity = [self.system_message, [_part_identity(p) for p in first], *([self.adapter] if self.adapter else [])]
        return hashlib.sha256(json.dumps(identity, ensure_ascii=False).encode()).digest()

    @property
    def inline(self) -> bool:
        """Whether the embeddings must travel inline: some reference is a combined one, unknown to the cache."""
        return any(ref.combined for ref in self.refs())


def _part_identity(part: RefPart) -> list:
    if isinstance(part, str):
        return ["text", part]
    if isinstance(part, ImageRef):
        return ["image", part.key]
    return ["video", [frame.key for frame in part.frames]]


def part_refs(parts: tuple[RefPart, ...]) -> list[ImageRef]:
    refs: list[ImageRef] = []
    for part in parts:
        if isinstance(part, ImageRef):
            refs.append(part)
        elif isinstance(part, VideoRef):
            refs.extend(part.frames)
    return refs


# ------------------------------------------------------------------------------------------- JSON (sessions)


def _ref_to_json(ref: ImageRef) -> dict:
    out: dict = {"key": ref.key, "tiles": ref.num_tiles}
    if ref.combined:
        out["combined"] = [_ref_to_json(r) for r in ref.combined]
    return out


def _ref_from_json(raw: dict) -> ImageRef:
    return ImageRef(str(raw["key"]), int(raw["tiles"]), tuple(_ref_from_json(r) for r in raw.get("combined", ())))


def part_to_json(part: RefPart) -> dict:
    if isinstance(part, str):
        return {"text": part}
    if isinstance(part, ImageRef):
        return {"image": _ref_to_json(part)}
    return {"video": [_ref_to_json(f) for f in part.frames]}


def part_from_json(raw: dict) -> RefPart:
    if "text" in raw:
        return str(raw["text"])
    if "image" in raw:
        return _ref_from_json(raw["image"])
    return VideoRef(tuple(_ref_from_json(f) for f in raw["video"]))


def turn_to_json(turn: TurnRecord) -> dict:
    return {"user": [part_to_json(p) for p in turn.user_parts], "assistant": turn.assistant_text}


def turn_from_json(raw: dict) -> TurnRecord:
    return TurnRecord(tuple(part_from_json(p) for p in raw["user"]), str(raw["assistant"]))
