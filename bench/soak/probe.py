"""What the soak samples: each process's resident memory and open file descriptors (from /proc), Redis's
`used_memory`, and every service's gauges of work in flight (from its /metrics), which must read 0 when the stack is
idle."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tools.launcher import metric, read_metrics

# Per service role: (metric name, labels) of the gauges that count work in flight; all 0 on an idle stack.
IDLE_GAUGES: dict[str, tuple[tuple[str, dict[str, str]], ...]] = {
    "gateway": (("internvl_gateway_in_flight_requests", {}), ("internvl_gateway_endpoint_in_flight", {})),
    "vision": (("internvl_vision_in_flight_requests", {}), ("internvl_vision_queue_tiles", {})),
    "llm": (("internvl_llm_in_flight_requests", {}), ("internvl_llm_running_sequences", {}),
            ("internvl_llm_waiting_sequences", {}), ("internvl_llm_kv_reserved_bytes", {}),
            ("internvl_llm_kv_cache_usage_bytes", {"pool": "running"})),
}


def rss_mib(pid: int) -> float | None:
    """VmRSS of a process in MiB (None if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def open_fds(pid: int) -> int | None:
    """Open file descriptors of a process (sockets, pipes and files alike), None if it is gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def role(name: str) -> str:
    """vision-1 -> vision, llm-0 -> llm, gateway -> gateway."""
    return name.split("-")[0]


def gauges(metrics_ports: Mapping[str, int]) -> dict[str, float]:
    """"SERVICE metric" -> value of every in-flight gauge of every service (summed over other labels)."""
    values = {}
    for name, port in metrics_ports.items():
        text = read_metrics(port)
        for gauge, labels in IDLE_GAUGES[role(name)]:
            values[f"{name} {gauge}" + "".join(f"{{{k}={v}}}" for k, v in labels.items())] = metric(text, gauge,
                                                                                                  **labels)
    return values


def wait_idle(metrics_ports: Mapping[str, int], timeout_s: float) -> dict[str, float]:
    """The gauges once all read 0, or as they read after `timeout_s` (a cancelled call may take a step to leave)."""
    deadline = time.monotonic() + timeout_s
    while True:
        values = gauges(metrics_ports)
        if not any(values.values()) or time.monotonic() > deadline:
            return values
        time.sleep(0.1)


@dataclass
class Sample:
    requests: int  # requests completed when it was taken
    elapsed_s: float
    rss_mib: dict[str, float] = field(default_factory=dict)  # process name -> MiB
    fds: dict[str, int] = field(default_factory=dict)
    redis_used_memory: int | None = None  # bytes, Redis's INFO memory used_memory
    gauges: dict[str, float] = field(default_factory=dict)


def take(requests: int, elapsed_s: float, pids: Mapping[str, int], metrics_ports: Mapping[str, int], redis,
         idle_timeout_s: float) -> Sample:
    """One sample, taken once the stack is idle (or `idle_timeout_s` passed): gauges first, then memory and fds."""
    sample = Sample(requests, elapsed_s, gauges=wait_idle(metrics_ports, idle_timeout_s))
    for name, pid in pids.items():
        rss, fds = rss_mib(pid), open_fds(pid)
        if rss is not None and fds is not None:
            sample.rss_mib[name], sample.fds[name] = round(rss, 2), fds
    if redis is not None:
        sample.redis_used_memory = int(redis.info("memory")["used_memory"])
    return sample
