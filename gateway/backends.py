"""What the orchestrator needs from the vision and LLM services, without any transport.

The domain types it exchanges with them and the two protocols its clients implement (gateway.clients does so over
gRPC; tests may substitute anything with the same methods). Keeping them here keeps the orchestrator free of gRPC.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.chat_response import Delta
from gateway.conversation import LLMConversation
from services.contract.encoding import EncodedItem, MediaItem
from services.contract.finish import FinishReason
from services.contract.model_info import ModelInfo
from services.contract.sampling import SamplingParams


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
    index: int = 0  # the answer it ends (0 to sampling.n - 1)


class VisionBackend(Protocol):
    async def model_info(self, timeout: float | None = None, wait_for_ready: bool = False) -> ModelInfo: ...

    async def lookup(self, keys: Sequence[str], timeout: float | None) -> list[bool]: ...

    def preferred(self, key: str) -> str | None: ...

    async def encode(self, items: Sequence[MediaItem], max_num: int, use_thumbnail: bool,
                     timeout: float | None, route_key: str | None = None) -> list[EncodedItem]: ...

    async def fetch(self, key: str, timeout: float | None) -> Embeddings: ...


class LLMBackend(Protocol):
    async def model_info(self, timeout: float | None = None, wait_for_ready: bool = False) -> ModelInfo: ...

    def generate(self, conversation: LLMConversation, sampling: SamplingParams, request_id: str,
                 inline: dict[str, Embeddings] | None, timeout: float | None
                 ) -> AsyncIterator[Delta | GenerateFinish]: ...
