"""A conversation as the LLM service sees it: text, and images by reference (cache keys), never pixels.

This is what the gateway sends to `Generate` and what a session stores between rounds. Placement of images in a
turn's text (`<image>\\n`, `Image-1: ...`, `Frame1: ...`, explicit placeholders) is the LLM service's prompt
builder's job (services.llm.prompt); the gateway keeps the parts in the caller's order.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.llm import template


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


Part = str | ImageRef | VideoRef


@dataclass(frozen=True)
class TurnRecord:
    user_parts: tuple[Part, ...]
    assistant_text: str


@dataclass(frozen=True)
class Conversation:
    user_parts: tuple[Part, ...]
    history: tuple[TurnRecord, ...] = ()
    # None keeps the model's default system message; "" means none.
    system_message: str | None = None

    def refs(self) -> list[ImageRef]:
        """Every image reference in prompt order (history first); a video contributes its frames."""
        return [ref for parts in (*(t.user_parts for t in self.history), self.user_parts) for ref in part_refs(parts)]

    @property
    def inline(self) -> bool:
        """Whether the embeddings must travel inline: some reference is a combined one, unknown to the cache."""
        return any(ref.combined for ref in self.refs())


def part_refs(parts: tuple[Part, ...]) -> list[ImageRef]:
    refs: list[ImageRef] = []
    for part in parts:
        if isinstance(part, ImageRef):
            refs.append(part)
        elif isinstance(part, VideoRef):
            refs.extend(part.frames)
    return refs


def image_slots(parts: tuple[Part, ...]) -> int:
    """How many `<image>` slots the LLM service will fill for this turn (an image one, a video one per frame)."""
    return len(part_refs(parts))


def placeholders(parts: tuple[Part, ...]) -> int:
    return sum(template.count_placeholders(p) for p in parts if isinstance(p, str))


# ------------------------------------------------------------------------------------------- JSON (sessions)


def _ref_to_json(ref: ImageRef) -> dict:
    out: dict = {"key": ref.key, "tiles": ref.num_tiles}
    if ref.combined:
        out["combined"] = [_ref_to_json(r) for r in ref.combined]
    return out


def _ref_from_json(raw: dict) -> ImageRef:
    return ImageRef(str(raw["key"]), int(raw["tiles"]), tuple(_ref_from_json(r) for r in raw.get("combined", ())))


def part_to_json(part: Part) -> dict:
    if isinstance(part, str):
        return {"text": part}
    if isinstance(part, ImageRef):
        return {"image": _ref_to_json(part)}
    return {"video": [_ref_to_json(f) for f in part.frames]}


def part_from_json(raw: dict) -> Part:
    if "text" in raw:
        return str(raw["text"])
    if "image" in raw:
        return _ref_from_json(raw["image"])
    return VideoRef(tuple(_ref_from_json(f) for f in raw["video"]))


def turn_to_json(turn: TurnRecord) -> dict:
    return {"user": [part_to_json(p) for p in turn.user_parts], "assistant": turn.assistant_text}


def turn_from_json(raw: dict) -> TurnRecord:
    return TurnRecord(tuple(part_from_json(p) for p in raw["user"]), str(raw["assistant"]))
