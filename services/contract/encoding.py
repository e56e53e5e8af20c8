"""What is sent to the vision service to encode and what it answers, and the key an item is stored under.

The gateway builds `MediaItem`s while planning a request and derives their keys with `item_key` to look them up
before sending any bytes; the vision service derives the same keys for the same items when it encodes them.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class EncodedItem:
    """Where one item's embeddings are stored, and how much of them there is."""

    key: str
    num_tiles: int
    # Embedding rows stored under ``key``: num_tiles * tokens_per_tile.
    num_tokens: int
    cache_hit: bool


def item_key(item: MediaItem, model_identity: str, max_num: int, use_thumbnail: bool, image_size: int,
             namespace: str = DEFAULT_NAMESPACE) -> str:
    """The cache key of ``item`` under resolved options (``model_identity`` from ``cache_keys.model_identity``)."""
    media = frame_media(item.data, item.height, item.width) if item.kind == "frame" else item.data
    return cache_key(model_identity, max_num, use_thumbnail, image_size, media, item.kind, namespace=namespace)
