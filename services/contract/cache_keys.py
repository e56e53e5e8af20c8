"""Content-addressed keys of the embedding cache: every process derives them the same way.

A key is a SHA-256 over the schema version, the model identity, every preprocessing parameter that changes the
embeddings, and the media bytes, each length-prefixed and type-tagged so no two different inputs can encode to the
same byte string. The vision service stores each image's embeddings under it; the gateway derives the same key to
look an image up before sending its bytes anywhere.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from services.contract.dtypes import DTYPE_NAMES

# Bump when the key derivation, the value layout or the embeddings' meaning changes: old entries then
# simply stop being found (their keys differ) and age out by TTL or LRU.
SCHEMA_VERSION = 1
DEFAULT_NAMESPACE = "internvl"
MEDIA_KINDS = ("image", "frame")



def _field_head(tag: bytes, name: str, payload_len: int) -> bytes:
    """What precedes a field's payload: ``tag | u64 len(name) | name | u64 len(payload)``."""
    name_b = name.encode()
    return tag + struct.pack(">Q", len(name_b)) + name_b + struct.pack(">Q", payload_len)


def _field(tag: bytes, name: str, payload: bytes) -> bytes:
    """One type-tagged, length-prefixed field; ``tag`` is i (int), b (bool), s (str) or y (bytes)."""
    return _field_head(tag, name, len(payload)) + payload


def _int_field(name: str, value: int) -> bytes:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return _field(b"i", name, str(value).encode())


def _bool_field(name: str, value: bool) -> bytes:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return _field(b"b", name, b"\x01" if value else b"\x00")


def _str_field(name: str, value: str) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    return _field(b"s", name, value.encode())


def model_identity(model_fingerprint: str, dtype: str, vision_adapter_digest: str = "", salt: str = "") -> str:
    """The ``model_fingerprint`` argument of ``cache_key`` for a model computing in ``dtype``.

    The same weights give different embeddings in bfloat16 and float32, so the compute dtype is part of the
    identity a key is derived from; so is a LoRA adapter that changes the vision tower or projector (its digest),
    while an adapter of the language model only encodes as the base. Every service that derives keys (vision,
    gateway) must use this, with the fingerprint, dtype and adapters that ``GetModelInfo`` reports. Stored values
    carry the plain fingerprint. A ``salt`` (the gateway's per-tenant embedding scope, EncodeRequest.key_salt) gives
    the same image other keys, so a tenant's cache hits are only its own encodes; "" is the shared scope.
    """
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {list(DTYPE_NAMES)}")
    identity = f"{model_fingerprint}:{dtype}"
    if vision_adapter_digest:
        identity += f":lora={vision_adapter_digest}"
    return f"{identity}:salt={salt}" if salt else identity


def key_prefix(namespace: str = DEFAULT_NAMESPACE) -> str:
    """What every embedding key of ``namespace`` starts with, for telling embedding keys from others."""
    return f"{namespace}:emb:"


def frame_media(rgb: bytes, height: int, width: int) -> bytes:
    """The ``media`` bytes of a raw RGB frame for ``cache_key(..., media_kind="frame")``.

    The shape is part of the content: the same pixel bytes read as 2x6 or 3x4 are different images.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"frame shape must be positive, got {height}x{width}")
    if len(rgb) != height * width * 3:
        raise ValueError(f"an RGB frame of {height}x{width} has {height * width * 3} bytes, got {len(rgb)}")
    return struct.pack(">QQ", height, width) + bytes(rgb)


def cache_key(
    model_fingerprint: str,
    max_num: int,
    use_thumbnail: bool,
    image_size: int,
    media: bytes,
    media_kind: str,
    *,
    namespace: str = DEFAULT_NAMESPACE,
) -> str:
    """The Redis key of one image's embeddings: ``{namespace}:emb:v{SCHEMA_VERSION}:{sha256 hex}``.

    ``media`` is the encoded image file for ``media_kind="image"`` and ``frame_media(...)`` for
    ``media_kind="frame"``. Every argument that changes the embeddings is hashed; add new preprocessing
    parameters here (and bump ``SCHEMA_VERSION`` if existing keys would change meaning).
    """
    if media_kind not in MEDIA_KINDS:
        raise ValueError(f"media_kind must be one of {MEDIA_KINDS}, got {media_kind!r}")
    if not model_fingerprint:
        raise ValueError("model_fingerprint must not be empty")
    h = hashlib.sha256()
    for part in (
        _int_field("schema_version", SCHEMA_VERSION),
        _str_field("model_fingerprint", model_fingerprint),
        _int_field("max_num", max_num),
        _bool_field("use_thumbnail", use_thumbnail),
        _int_field("image_size", image_size),
        _str_field("media_kind", media_kind),
    ):
        h.update(part)
    # The media last, streamed into the hash without building one more copy of it.
    media_b = memoryview(media).cast("B")
    h.update(_field_head(b"y", "media", media_b.nbytes))
    h.update(media_b)
    return f"{namespace}:emb:v{SCHEMA_VERSION}:{h.hexdigest()}"


def combined_key(keys: Sequence[str], namespace: str = DEFAULT_NAMESPACE) -> str:
    """The name of several images' embeddings concatenated in this order (the combined multi-image mode):
    ``{namespace}:combined:v1:{sha256 hex}``. Never stored (those embeddings travel inline), but deterministic, so
    the LLM service's prefix cache still recognises the same images in the next round."""
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()
    return f"{namespace}:combined:v1:{digest}"
