"""The keeper of vLLM's AsyncLLM (services.llm.engine.vllm.keeper) over a stand-in AsyncLLM: it notices a dead engine
without a request, tells the engine, retries a replacement that fails to start, loads the adapters into each one, and
shuts down one that comes up after the service closed. (The real engine core is killed in test_vllm_parity.py.)"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import ClassVar

import pytest
import vllm.v1.engine.async_llm
from helpers.engine import until

from services.llm.engine.vllm import keeper as keeper_module
from services.llm.engine.vllm.keeper import AsyncLLMKeeper
from services.model.adapters import Adapter

pytestmark = pytest.mark.asyncio


class FakeLLM:
    """What the keeper uses of an AsyncLLM."""

    made: ClassVar[list[FakeLLM]] = []
    failures = 0  # starts still to fail
    gate: threading.Event | None = None  # a start waits for it when set

    def __init__(self):
        self.errored = False
        self.shut_down = False
        self.loras: list[str] = []

    @classmethod
    def from_engine_args(cls, engine_args, stat_loggers):
        if cls.gate is not None:
            cls.gate.wait(10)
        if cls.failures:
            cls.failures -= 1
            raise RuntimeError("no memory for the KV cache")
        llm = cls()
        cls.made.append(llm)
        return llm

    async def add_lora(self, request) -> bool:
        self.loras.append(request.lora_name)
        return True

    def shutdown(self) -> None:
        self.shut_down = True


@pytest.fixture(autouse=True)
def fake_llm(monkeypatch):
    monkeypatch.setattr(vllm.v1.engine.async_llm, "AsyncLLM", FakeLLM)
    monkeypatch.setattr(keeper_module, "WATCH_INTERVAL_S", 0.01)
    monkeypatch.setattr(keeper_module, "RESTART_DELAYS_S", (0.01, 0.02))
    FakeLLM.made, FakeLLM.failures, FakeLLM.gate = [], 0, None


def language_adapter(name: str) -> Adapter:
    import torch

    module = {"language_model.model.layers.0.mlp.up_proj": (torch.zeros(2, 4), torch.zeros(4, 2))}
    return Adapter(name, Path("."), 2, 4.0, False, module, name)


async def test_a_dead_engine_is_replaced_and_the_engine_told_both_ways():
    events: list[str] = []
    keeper = AsyncLLMKeeper(object(), [language_adapter("a"), language_adapter("b")], list,
                            on_down=lambda: events.append("down"), on_up=lambda: events.append("up"))
    await keeper.start()
    try:
        first = keeper.llm
        assert keeper.serving and first.loras == ["a", "b"] and events == []
        FakeLLM.failures = 2  # the first two replacements fail to start
        FakeLLM.gate = threading.Event()  # and none starts before the test looked
        first.errored = True
        await until(lambda: events == ["down"] and first.shut_down, timeout=5)
        assert not keeper.serving and keeper.restarting
        FakeLLM.gate.set()
        await until(lambda: events == ["down", "up"], timeout=5)
        assert keeper.serving and keeper.llm is FakeLLM.made[1] and keeper.restarts == 1
        assert keeper.llm.loras == ["a", "b"]  # loaded again into the new one
    finally:
        await keeper.close()
    assert FakeLLM.made[1].shut_down


async def test_one_that_comes_up_after_close_is_shut_down():
    keeper = AsyncLLMKeeper(object(), [], list, on_down=lambda: None, on_up=lambda: None)
    await keeper.start()
    FakeLLM.gate = threading.Event()
    keeper.llm.errored = True
    await until(lambda: keeper.restarting, timeout=5)
    await asyncio.sleep(0.05)  # the replacement is starting (held by the gate)
    await keeper.close()
    FakeLLM.gate.set()
    await until(lambda: len(FakeLLM.made) == 2 and FakeLLM.made[1].shut_down, timeout=5)


async def test_adapters_get_private_copies_removed_at_close():
    vision_only = Adapter("v", Path("."), 2, 4.0, False, {"mlp1.1": (None, None)}, "v")
    keeper = AsyncLLMKeeper(object(), [language_adapter("a"), vision_only], list, on_down=lambda: None,
                            on_up=lambda: None)
    await keeper.start()
    copy = Path(keeper.loras["a"].lora_path)
    assert keeper.loras["v"] is None and copy.is_dir() and keeper.llm.loras == ["a"]
    await keeper.close()
    assert not copy.parent.exists()
