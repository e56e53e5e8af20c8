"""What is sent to the vision service to encode and what it answers, and the key an item is stored under.

The gateway builds `MediaItem`s while planning a request and derives their keys with `item_key` to look them up
before sending any bytes; the vision service derives the same keys for the same items when it encodes them. Each type
owns its wire form (`internvl.vision.v1` / `internvl.common.v1`).
"""

from __future__ import annotations

from dataclasses import dataclass

from internvl.common.v1 import common_pb2
from internvl.vision.v1 import vision_pb2

from services.contract.cache_keys import DEFAULT_NAMESPACE, cache_key, frame_media


@dataclass(frozen=True)
class MediaItem:
    """One image to encode: an encoded file (``kind="image"``) or raw RGB pixels (``kind="frame"``)."""

    kind: str  # "image", "frame", or "" when a request set neither
    data: bytes
    # Only for frames.
    height: int = 0
    width: int = 0

    @classmethod
    def image(cls, data: bytes) -> MediaItem:
        return cls("image", bytes(data))

    @classmethod
    def frame(cls, rgb: bytes, height: int, width: int) -> MediaItem:
        return cls("frame", bytes(rgb), height, width)

    def to_pb(self) -> vision_pb2.EncodeItem:
        if self.kind == "image":
            return vision_pb2.EncodeItem(image_bytes=self.data)
        return vision_pb2.EncodeItem(frame=vision_pb2.RawFrame(rgb=self.data, height=self.height, width=self.width))

    @classmethod
    def from_pb(cls, message: vision_pb2.EncodeItem) -> MediaItem:
        """An item that sets neither medium becomes kind "" (the vision service refuses it, naming its index)."""
        which = message.WhichOneof("media")
        if which == "image_bytes":
            return cls.image(message.image_bytes)
        if which == "frame":
            return cls.frame(message.frame.rgb, message.frame.height, message.frame.width)
        return cls("", b"")


@dataclass(frozen=True)
class PreprocessOptions:
    """Preprocessing options of an Encode request; None means the model's default."""

    max_num: int | None = None
    use_thumbnail: bool | None = None

    def to_pb(self) -> common_pb2.PreprocessOptions:
        return common_pb2.PreprocessOptions(max_num=self.max_num, use_thumbnail=self.use_thumbnail)

    @classmethod
    def from_pb(cls, message: common_pb2.PreprocessOptions) -> PreprocessOptions:
        return cls(message.max_num if message.HasField("max_num") else None,
                   message.use_thumbnail if message.HasField("use_thumbnail") else None)


@dataclass(frozen=True)
class EncodedItem:
    """Where one item's embeddings are stored, and how much of them there is."""

    key: str
    num_tiles: int
    # Embedding rows stored under ``key``: num_tiles * tokens_per_tile.
    num_tokens: int
    cache_hit: bool

    def to_pb(self) -> vision_pb2.EncodedItem:
        return vision_pb2.EncodedItem(key=self.key, num_tiles=self.num_tiles, num_tokens=self.num_tokens,
                                      cache_hit=self.cache_hit)

    @classmethod
    def from_pb(cls, message: vision_pb2.EncodedItem) -> EncodedItem:
        return cls(message.key, message.num_tiles, message.num_tokens, message.cache_hit)


def item_key(item: MediaItem, model_identity: str, max_num: int, use_thumbnail: bool, image_size: int,
             namespace: str = DEFAULT_NAMESPACE) -> str:
    """The cache key of ``item`` under resolved options (``model_identity`` from ``cache_keys.model_identity``)."""
    media = frame_media(item.data, item.height, item.width) if item.kind == "frame" else item.data
    return cache_key(model_identity, max_num, use_thumbnail, image_size, media, item.kind, namespace=namespace)
