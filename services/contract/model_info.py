"""The identity of the loaded model that every service reports through GetModelInfo, and its one wire mapping.

The gateway derives cache keys and byte budgets from it and refuses to serve when the two pools disagree on the
fingerprint or on the LoRA adapters served beside the base.
"""

from __future__ import annotations

from dataclasses import dataclass

from internvl.common.v1 import common_pb2

from services.contract.cache_keys import model_identity
from services.contract.dtypes import DTYPE_FROM_PB, DTYPE_TO_PB, ITEMSIZE


@dataclass(frozen=True)
class AdapterInfo:
    """A LoRA adapter served beside the base under `name` (a model id); `digest` names its content."""

    name: str
    digest: str
    touches_vision: bool
    rank: int

    def to_pb(self) -> common_pb2.AdapterInfo:
        return common_pb2.AdapterInfo(name=self.name, digest=self.digest, touches_vision=self.touches_vision,
                                      rank=self.rank)

    @classmethod
    def from_pb(cls, message: common_pb2.AdapterInfo) -> AdapterInfo:
        return cls(message.name, message.digest, message.touches_vision, message.rank)


@dataclass(frozen=True)
class ModelInfo:
    fingerprint: str
    model_name: str
    llm_hidden_size: int
    # A name of `services.contract.dtypes` ("" when a peer reports none).
    dtype: str
    tokens_per_tile: int
    image_size: int
    llm_architecture: str = ""
    vision_architecture: str = ""
    adapters: tuple[AdapterInfo, ...] = ()

    @property
    def serving_identity(self) -> str:
        """What every replica of a pool must report alike: the base's fingerprint and each adapter's name and digest
        (a replica that serves other adapters would answer a model id differently)."""
        return ";".join([self.fingerprint, *sorted(f"{a.name}={a.digest}" for a in self.adapters)])

    def adapter(self, name: str) -> AdapterInfo | None:
        return next((a for a in self.adapters if a.name == name), None)

    def key_identity(self, adapter: str = "", salt: str = "") -> str:
        """`cache_keys.model_identity` of images encoded with `adapter` ("" the base; it must be served) under the
        key salt `salt` ("" unsalted)."""
        info = self.adapter(adapter) if adapter else None
        return model_identity(self.fingerprint, self.dtype, info.digest if info and info.touches_vision else "", salt)

    @property
    def bytes_per_tile(self) -> int:
        """The size of one tile's embeddings [tokens_per_tile, llm_hidden_size] in the model's dtype."""
        return self.tokens_per_tile * self.llm_hidden_size * ITEMSIZE.get(self.dtype, 2)

    def to_pb(self) -> common_pb2.ModelInfo:
        return common_pb2.ModelInfo(
            fingerprint=self.fingerprint, model_name=self.model_name, llm_hidden_size=self.llm_hidden_size,
            dtype=DTYPE_TO_PB.get(self.dtype, common_pb2.DTYPE_UNSPECIFIED), tokens_per_tile=self.tokens_per_tile,
            image_size=self.image_size, llm_architecture=self.llm_architecture,
            vision_architecture=self.vision_architecture, adapters=[a.to_pb() for a in self.adapters])

    @classmethod
    def from_pb(cls, message: common_pb2.ModelInfo) -> ModelInfo:
        return cls(fingerprint=message.fingerprint, model_name=message.model_name,
                   llm_hidden_size=message.llm_hidden_size, dtype=DTYPE_FROM_PB.get(message.dtype, ""),
                   tokens_per_tile=message.tokens_per_tile, image_size=message.image_size,
                   llm_architecture=message.llm_architecture, vision_architecture=message.vision_architecture,
                   adapters=tuple(AdapterInfo.from_pb(a) for a in message.adapters))
