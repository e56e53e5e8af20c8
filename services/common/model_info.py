"""The model identity every service reports through GetModelInfo, and the wire names of tensor dtypes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from internvl.common.v1 import common_pb2

from services.common.checkpoint import Checkpoint

DTYPE_TO_PB = {
    "bfloat16": common_pb2.DTYPE_BFLOAT16,
    "float16": common_pb2.DTYPE_FLOAT16,
    "float32": common_pb2.DTYPE_FLOAT32,
}
DTYPE_FROM_PB = {value: name for name, value in DTYPE_TO_PB.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bfloat16", the spelling used in configs, cache headers and on the wire."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class ModelInfo:
    fingerprint: str
    model_name: str
    llm_hidden_size: int
    dtype: str
    tokens_per_tile: int
    image_size: int
    llm_architecture: str
    vision_architecture: str

    @classmethod
    def of(cls, checkpoint: Checkpoint, dtype: torch.dtype) -> ModelInfo:
        spec = checkpoint.spec
        vision_archs = checkpoint.config.get("vision_config", {}).get("architectures") or ["InternVisionModel"]
        return cls(fingerprint=checkpoint.fingerprint, model_name=checkpoint.name,
                   llm_hidden_size=spec.llm_hidden_size, dtype=dtype_name(dtype),
                   tokens_per_tile=spec.tokens_per_tile, image_size=spec.image_size,
                   llm_architecture=spec.llm_architecture, vision_architecture=vision_archs[0])

    def to_pb(self) -> common_pb2.ModelInfo:
        return common_pb2.ModelInfo(
            fingerprint=self.fingerprint, model_name=self.model_name, llm_hidden_size=self.llm_hidden_size,
            dtype=DTYPE_TO_PB.get(self.dtype, common_pb2.DTYPE_UNSPECIFIED), tokens_per_tile=self.tokens_per_tile,
            image_size=self.image_size, llm_architecture=self.llm_architecture,
            vision_architecture=self.vision_architecture)
