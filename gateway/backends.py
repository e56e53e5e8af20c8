"""What the orchestrator needs from the vision and LLM services, without any transport.

The domain types it exchanges with them and the two protocols its clients implement (gateway.clients does so over
gRPC; tests may substitute anything with the same methods). Keeping them here keeps the orchestrator free of gRPC.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.conversation import Conversation
from gateway.types import Delta, FinishReason, Sampling
from services.common.errors import ModelMismatchError

log = logging.getLogger(__name__)
DTYPE_SIZES = {"bfloat16": 2, "float16": 2, "float32": 4}
_ITEM_PREFIX = re.compile(r"^items\[\d+\]:\s*")


@dataclass(frozen=True)
class ModelIdentity:
    """What a service reports about its model (GetModelInfo); keys and byte counts derive from it."""

    fingerprint: str
    model_name: str
    dtype: str
    tokens_per_tile: int
    image_size: int
    llm_hidden_size: int

    @property
    def bytes_per_tile(self) -> int:
        return self.tokens_per_tile * self.llm_hidden_size * DTYPE_SIZES.get(self.dtype, 2)


@dataclass(frozen=True)
class EncodeItem:
    """An encoded image file (`kind="image"`) or RGB pixels (`kind="frame"`, with height and width)."""

    kind: str
    data: bytes
    height: int = 0
    width: int = 0


@dataclass(frozen=True)
class EncodedItem:
    key: str
    num_tiles: int
    cache_hit: bool


@dataclass(frozen=True)
class Embeddings:
    """One cached tensor [rows, hidden] as raw little-endian bytes."""

    dtype: int  # internvl.common.v1.DType
    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True)
class GenerateFinish:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int


class VisionBackend(Protocol):
    async def model_info(self, timeout: float | None = None, wait_for_ready: bool = False) -> ModelIdentity: ...

    async def lookup(self, keys: Sequence[str], timeout: float | None) -> list[bool]: ...

    async def encode(self, items: Sequence[EncodeItem], max_num: int, use_thumbnail: bool,
                     timeout: float | None) -> list[EncodedItem]: ...

    async def fetch(self, key: str, timeout: float | None) -> Embeddings: ...


class LLMBackend(Protocol):
    async def model_info(self, timeout: float | None = None, wait_for_ready: bool = False) -> ModelIdentity: ...

    def generate(self, conversation: Conversation, sampling: Sampling, request_id: str,
                 inline: dict[str, Embeddings] | None, timeout: float | None
                 ) -> AsyncIterator[Delta | GenerateFinish]: ...


def check_same_model(vision: ModelIdentity, llm: ModelIdentity) -> None:
    """Decision 6: the gateway serves only when both pools loaded the same model."""
    if vision.fingerprint != llm.fingerprint:
        raise ModelMismatchError(f"the vision service serves model {vision.fingerprint} ({vision.model_name}) "
                                 f"but the LLM service serves {llm.fingerprint} ({llm.model_name})")
    if vision.dtype and llm.dtype and vision.dtype != llm.dtype:
        log.warning("vision embeddings are %s but the LLM computes in %s", vision.dtype, llm.dtype)


def strip_item_prefix(message: str) -> str:
    """The vision service's message without its `items[i]: ` prefix (the gateway names the part instead)."""
    return _ITEM_PREFIX.sub("", message)
