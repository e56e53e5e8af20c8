"""The engine's memory probe on the CPU: MemAvailable, a container's cgroup limit, and the default KV budget."""

from __future__ import annotations

import pytest
import torch

from services.llm.engine import memory
from services.llm.engine.memory import default_kv_budget_bytes, free_memory_bytes

CPU = torch.device("cpu")


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A /proc/meminfo with 500 KiB available and an empty cgroup v2 folder, in place of the real ones."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        1000 kB\nMemFree:          200 kB\nMemAvailable:     500 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    monkeypatch.setattr(memory, "MEMINFO", meminfo)
    monkeypatch.setattr(memory, "CGROUP", cgroup)
    return meminfo, cgroup


def test_a_cgroup_limit_tighter_than_memavailable_wins(machine):
    _, cgroup = machine
    (cgroup / "memory.max").write_text("409600\n")  # 400 KiB
    (cgroup / "memory.current").write_text("102400\n")  # 100 KiB used
    assert free_memory_bytes(CPU) == 300 * 1024


def test_without_a_limit_memavailable_counts(machine):
    meminfo, cgroup = machine
    (cgroup / "memory.max").write_text("max\n")
    assert free_memory_bytes(CPU) == 500 * 1024
    (cgroup / "memory.max").unlink()  # cgroup v1, or no cgroup: MemAvailable alone
    assert free_memory_bytes(CPU) == 500 * 1024
    meminfo.unlink()
    assert free_memory_bytes(CPU) == 0


def test_the_default_kv_budget_is_a_share_of_what_the_prefix_cache_leaves(machine):
    free = 500 * 1024
    assert default_kv_budget_bytes(CPU, 100 * 1024) == int((free - 100 * 1024) * memory.DEFAULT_KV_SHARE)
    assert default_kv_budget_bytes(CPU, 2 * free) == 0
