"""How an answer ended and what it cost, as the LLM service reports it and the gateway passes it on."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from internvl.common.v1 import common_pb2


class FinishReason(enum.Enum):
    """`internvl.common.v1.FinishReason`, by the same names (`FINISH_REASON_<NAME>`)."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"

    def to_pb(self) -> common_pb2.FinishReason:
        return common_pb2.FinishReason.Value(f"FINISH_REASON_{self.name}")

    @classmethod
    def from_pb(cls, value: int) -> FinishReason:
        """An unset or unknown value is STOP (the model ended its turn)."""
        try:
            return cls[common_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_")]
        except (ValueError, KeyError):
            return cls.STOP


@dataclass(frozen=True)
class Usage:
    """`internvl.common.v1.Usage`: the LLM service fills the token counts, the gateway the image and tile counts."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Leading prompt tokens whose KV came from the prefix cache instead of being prefilled.
    cached_prompt_tokens: int = 0
    # Tiles of every image and video frame in the prompt, history included, in prompt order.
    image_tiles: tuple[int, ...] = ()
    # Tiles the vision service encoded for this request (cache misses), and those reused from the cache.
    encoded_tiles: int = 0
    reused_tiles: int = 0

    def to_pb(self) -> common_pb2.Usage:
        return common_pb2.Usage(
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
            cached_prompt_tokens=self.cached_prompt_tokens, image_tiles=self.image_tiles,
            encoded_tiles=self.encoded_tiles, reused_tiles=self.reused_tiles)

    @classmethod
    def from_pb(cls, message: common_pb2.Usage) -> Usage:
        return cls(message.prompt_tokens, message.completion_tokens, message.cached_prompt_tokens,
                   tuple(message.image_tiles), message.encoded_tiles, message.reused_tiles)

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "cached_prompt_tokens": self.cached_prompt_tokens, "image_tiles": list(self.image_tiles),
                "encoded_tiles": self.encoded_tiles, "reused_tiles": self.reused_tiles}
