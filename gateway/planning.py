"""From a request's content parts to a plan: its images and frames read, probed, tiled on paper and keyed.

Runs before any call to the services, so bad input (a missing file, a path outside the media root, undecodable
media, a placeholder count that does not match the images) is refused early, naming the part. Every image or video
frame becomes a `PendingImage` carrying the content-addressed key the vision service will store it under (the same
`services.contract.cache_keys` functions the vision service uses) and its tile count (`count_tiles`, the same tiling rule),
so a cache hit needs neither decoding nor a call to the encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.chat_request import CallerTurn, ContentPart, MultiImageMode
from gateway.media import MediaResolver
from services.contract import template
from services.contract.encoding import MediaItem, item_key
from services.contract.errors import InvalidArgumentError
from services.contract.model_info import ModelInfo
from services.contract.tiling import count_tiles

# The original `load_image` and `load_video` always tile with a thumbnail; so does the gateway, explicitly, so
# that keys do not depend on a checkpoint's config default.
USE_THUMBNAIL = True


@dataclass
class PendingImage:
    """One image or video frame of this request. `key` and `num_tiles` are confirmed by Encode on a miss."""

    where: str
    item: MediaItem
    max_num: int
    key: str
    num_tiles: int
    # Set when this request had the vision service encode it (a miss).
    encoded: bool = False


@dataclass
class PendingVideo:
    frames: list[PendingImage]


@dataclass
class PendingCombined:
    """Several images under one placeholder (MultiImageMode.COMBINED)."""

    images: list[PendingImage]


PlannedPart = str | PendingImage | PendingVideo | PendingCombined


@dataclass
class PlannedTurn:
    where: str
    parts: list[PlannedPart]
    assistant_text: str | None = None


@dataclass
class Plan:
    """The caller's history turns, then the new turn."""

    turns: list[PlannedTurn]
    images: list[PendingImage] = field(default_factory=list)


class Keyer:
    """Cache keys and tile counts exactly as the vision service derives them, for one model and adapter ("" the
    base)."""

    def __init__(self, model: ModelInfo, namespace: str, adapter: str = "", salt: str = ""):
        self.model, self.adapter, self.salt = model, adapter, salt
        self.identity = model.key_identity(adapter, salt)
        self.image_size = model.image_size
        self.namespace = namespace

    def salted(self, salt: str) -> Keyer:
        """This keyer for the key salt `salt` (EncodeRequest.key_salt; "" unsalted)."""
        return self if salt == self.salt else Keyer(self.model, self.namespace, self.adapter, salt)

    def key(self, item: MediaItem, max_num: int) -> str:
        return item_key(item, self.identity, max_num, USE_THUMBNAIL, self.image_size, self.namespace)

    def tiles(self, width: int, height: int, max_num: int) -> int:
        return count_tiles(width, height, max_num, self.image_size, USE_THUMBNAIL)


def check_max_num(value: int, where: str, limit: int) -> None:
    if not 1 <= value <= limit:
        raise InvalidArgumentError(f"{where}: max_num must be between 1 and {limit}, got {value}")


def resolve_part(part: ContentPart, where: str, max_num: int, media: MediaResolver, keyer: Keyer) -> PlannedPart:
    """Reads and probes one part (blocking: run it in an executor)."""
    if part.text is not None:
        template.check_text(part.text, where)
        return part.text
    if part.image is not None:
        image = part.image
        max_num = image.detail.max_num(max_num)
        probed = media.image(image.data, image.path, image.url, where=f"{where} (image)")
        item = MediaItem.image(probed.data)
        return PendingImage(f"{where} (image)", item, max_num, keyer.key(item, max_num),
                            keyer.tiles(probed.width, probed.height, max_num))
    video = part.video
    assert video is not None
    frames = media.video(video.data, video.path, video.url, num_segments=video.num_segments, bound=video.bound,
                         where=f"{where} (video)")
    pending = []
    for number, frame in enumerate(frames):
        item = MediaItem.frame(frame.rgb, frame.height, frame.width)
        pending.append(PendingImage(f"{where} (video) frame {number + 1}", item, video.max_num,
                                    keyer.key(item, video.max_num), keyer.tiles(frame.width, frame.height,
                                                                                video.max_num)))
    return PendingVideo(pending)


def arrange_turn(where: str, parts: list[PlannedPart], mode: MultiImageMode) -> list[PlannedPart]:
    """Applies the multi-image mode and checks explicit `<image>` placeholders against the turn's images."""
    images = [p for p in parts if isinstance(p, PendingImage)]
    if mode is MultiImageMode.COMBINED and len(images) > 1:
        # One reference at the first image's position stands for them all.
        combined, arranged = PendingCombined(images), []
        for part in parts:
            if part is images[0]:
                arranged.append(combined)
            elif not isinstance(part, PendingImage):
                arranged.append(part)
        parts = arranged
    slots = sum(len(p.frames) if isinstance(p, PendingVideo) else 1 for p in parts if not isinstance(p, str))
    placeholders = sum(template.count_placeholders(p) for p in parts if isinstance(p, str))
    if placeholders and placeholders != slots:
        what = "one combined image" if any(isinstance(p, PendingCombined) for p in parts) else "images"
        raise InvalidArgumentError(
            f"{where} has {placeholders} {template.IMAGE_PLACEHOLDER} placeholder(s) but {slots} {what} (each video "
            f"frame counts as one); write one placeholder per image, or none to have them placed automatically")
    return parts


def flatten(parts: list[PlannedPart]) -> list[PendingImage]:
    out: list[PendingImage] = []
    for part in parts:
        if isinstance(part, PendingImage):
            out.append(part)
        elif isinstance(part, PendingVideo):
            out.extend(part.frames)
        elif isinstance(part, PendingCombined):
            out.extend(part.images)
    return out


def turn_jobs(history: tuple[CallerTurn, ...], content: tuple[ContentPart, ...], max_num: int, media: MediaResolver,
              keyer: Keyer) -> list[tuple[str, str | None, list[Callable[[], PlannedPart]]]]:
    """Per turn (the caller's history first, then the new one): its name, its answer and one job per part."""
    turns = [(f"history[{n}]", t.assistant_text, t.user, "user_content") for n, t in enumerate(history)]
    turns.append(("content", None, content, None))
    jobs = []
    for where, answer, parts, field_name in turns:
        prefix = f"{where}.{field_name}" if field_name else where
        jobs.append((where, answer, [
            (lambda p=p, w=f"{prefix}[{i}]": resolve_part(p, w, max_num, media, keyer)) for i, p in enumerate(parts)]))
    return jobs
