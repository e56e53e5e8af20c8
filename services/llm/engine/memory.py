"""How much memory the engine may take: the device's free memory, read once at start, sizes the KV budget.

On a GPU that is what the driver reports free. On the CPU it is the lesser of the kernel's MemAvailable and what the
cgroup (a container's memory limit) leaves, since a process in a container is killed at the cgroup's limit long
before the machine runs out.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Of the memory free when the engine starts (less the prefix cache's budget), the share admission may promise to
# running sequences' KV; the rest is for activations, a prefill forward's copy of its rows' past, and the allocator.
DEFAULT_KV_SHARE = 0.8

MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")  # cgroup v2: memory.max ("max": no limit) and memory.current


def free_memory_bytes(device: torch.device) -> int:
    """Memory this process can still allocate on `device`: the GPU's free memory, or on the CPU the lesser of the
    kernel's MemAvailable and what the cgroup leaves (0 when neither can be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = []
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free.append(int(line.split()[1]) * 1024)
        limit = (CGROUP / "memory.max").read_text().strip()
        if limit != "max":
            free.append(int(limit) - int((CGROUP / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(free) if free else 0


def default_kv_budget_bytes(device: torch.device, prefix_cache_budget_bytes: int) -> int:
    """The KV budget admission keeps to when none is configured: DEFAULT_KV_SHARE of the memory free now, less the
    prefix cache's budget (the two budgets are separate; their sum is what KV may take)."""
    free = free_memory_bytes(device) - prefix_cache_budget_bytes
    return int(max(0, free) * DEFAULT_KV_SHARE)
