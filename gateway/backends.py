"""What the orchestrator needs from the vision and LLM services, without any transport.

The domain types it exchanges with them and the two protocols its clients implement (gateway.clients does so over
gRPC; tests may substitute anything with the same methods). Keeping them here keeps the orchestrator free of gRPC.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from internvl.llm.v1 import llm_pb2

from gateway.chat_response import Delta
from services.contract.conversation import Conversation
from services.contract.encoding import EncodedItem, MediaItem
from services.contract.finish import FinishReason, Usage
from services.contract.model_info import ModelInfo
from services.contract.priority import Priority
from services.contract.sampling import SamplingParams


@dataclass(frozen=True)
class Embeddings:
    """One cached tensor [rows, hidden] as raw little-endian bytes."""

    dtype: int  # internvl.common.v1.DType
    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True)
class GenerateFinish:
    """The end of one answer as the LLM service reports it: the token counts of `usage`, no tile counts."""

    reason: FinishReason
    usage: Usage
    index: int = 0  # the answer it ends (0 to sampling.n - 1)

    @classmethod
    def from_pb(cls, message: llm_pb2.GenerateFinish) -> GenerateFinish:
        return cls(FinishReason.from_pb(message.reason), Usage.from_pb(message.usage), message.index)


class VisionBackend(Protocol):
    async def model_info(self, timeout: float | None = None, wait_for_ready: bool = False) -> ModelInfo: ...

    async def lookup(self, keys: Sequence[str], timeout: float | None) -> list[bool]: ...

    def preferred(self, key: str) -> str | None: ...

    async def encode(self, items: Sequence[MediaItem], max_num: int, use_thumbnail: bool,
                     timeout: float | None, route_key: str | None = None, adapter: str = "",
                     key_salt: str = "") -> list[EncodedItem]: ...

    async def fetch(self, key: str, timeout: float | None, item: MediaItem | None = None, max_num: int = 0,
                    adapter: str = "") -> Embeddings: ...


class LLMBackend(Protocol):
    async def model_info(self, timeout: float | None = None, wait_for_ready: bool = False) -> ModelInfo: ...

    def generate(self, conversation: Conversation, sampling: SamplingParams, request_id: str,
                 inline: dict[str, Embeddings] | None, timeout: float | None,
                 priority: Priority | None = None) -> AsyncIterator[Delta | GenerateFinish]: ...
