"""Fixtures of the LLM service tests: reference chats, image embeddings, in-process services, result collection."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import engine

from services.llm.config import LLMConfig
from services.llm.metrics import LLMMetrics
from services.llm.service import LLMService
from services.model.chat import InternVLChat
from services.vision.preprocess import load_image


@pytest.fixture(scope="session")
def reference(tiny_checkpoint):
    """reference(llm) -> InternVLChat of the tiny checkpoint in float32 on CPU (the single-process reference path)."""
    chats: dict[str, InternVLChat] = {}

    def get(llm: str = "qwen2") -> InternVLChat:
        if llm not in chats:
            chats[llm] = InternVLChat.load(str(tiny_checkpoint(llm=llm)), dtype="float32", device="cpu")
        return chats[llm]

    return get


@pytest.fixture(scope="session")
def pixels(golden_dir):
    """Pixel tiles of a few golden images: 1-tile images and a 3-tile wide one."""
    return {
        "small": load_image(golden_dir / "small_120x90.png", max_num=1),
        "wide": load_image(golden_dir / "wide_2200x300.png", max_num=2),
        "landscape": load_image(golden_dir / "landscape_1000x700.png", max_num=1),
        "portrait": load_image(golden_dir / "portrait_333x1200.png", max_num=1),
    }


def _embeddings_of(chat: InternVLChat, tiles: torch.Tensor) -> torch.Tensor:
    return chat.vision.encode(tiles).reshape(-1, chat.language_model.config.hidden_size)


@pytest.fixture(scope="session")
def embeddings_of():
    """embeddings_of(chat, tiles) -> what the vision service stores: [tiles * 256, llm_hidden]."""
    return _embeddings_of


@pytest.fixture(scope="session")
def make_service(reference):
    """make_service(llm, **LLMConfig fields) -> async context manager of a started in-process LLMService.

    It shares the reference chat's language model (read-only), so no weights are loaded twice.
    """

    @contextlib.asynccontextmanager
    async def make(llm: str = "qwen2", **overrides):
        chat = reference(llm)
        config = LLMConfig(model=str(chat.checkpoint.path), dtype="float32", device="cpu", **overrides)
        service = LLMService.with_model(config, chat.checkpoint, chat.language_model, chat.tokenizer, LLMMetrics())
        await service.start()
        try:
            yield service
        finally:
            await service.close()

    return make


@pytest.fixture(scope="session")
def collect():
    """await collect(stream) -> Result: every event of an engine stream, gathered."""
    return engine.collect
