"""What the soak samples: each process's resident memory and open file descriptors (from /proc), Redis's
`used_memory`, and every service's gauges of work in flight (from its /metrics), which must read 0 when the stack is
idle."""

from __future__ import annotations

import contextlib
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

# Per service role: caches that may grow up to a budget by design, sampled for context (not held to 0).
CACHE_GAUGES: dict[str, tuple[tuple[str, dict[str, str]], ...]] = {
    "llm": (("internvl_llm_kv_cache_usage_bytes", {"pool": "prefix"}),),
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


def redis_connections(redis_port: int) -> set[int]:
    """Socket inodes of the machine's established TCP connections to or from `redis_port`: the Redis clients' pooled
    connections (each pool grows to the most commands it ever had at once, up to its bound, and never shrinks) and
    redis-server's ends of them."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            local, remote, state, inode = cols[1], cols[2], cols[3], int(cols[9])
            ports = {int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16)}
            if state == "01" and redis_port in ports:  # 01: ESTABLISHED
                found.add(inode)
    return found


def socket_inodes(pid: int) -> list[int]:
    """The inodes of a process's open sockets."""
    inodes = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.append(int(target[8:-1]))
    except OSError:
        pass
    return inodes


def role(name: str) -> str:
    """vision-1 -> vision, llm-0 -> llm, gateway -> gateway."""
    return name.split("-")[0]


def gauges(metrics_ports: Mapping[str, int]) -> dict[str, float]:
    """"SERVICE metric{labels}" -> value of every in-flight gauge of every service (summed over other labels)."""
    return _read(metrics_ports, IDLE_GAUGES)


def _read(metrics_ports: Mapping[str, int], table: Mapping[str, tuple]) -> dict[str, float]:
    """"SERVICE metric{labels}" -> value of the gauges `table` names for each service's role."""
    values = {}
    for name, port in metrics_ports.items():
        if not table.get(role(name)):
            continue
        text = read_metrics(port)
        for gauge, labels in table[role(name)]:
            label_text = "".join(f"{{{k}={v}}}" for k, v in labels.items())
            values[f"{name} {gauge}{label_text}"] = metric(text, gauge, **labels)
    return values


def redis_keys(redis) -> dict[str, int]:
    """Keys of the stack's Redis by kind (NS:emb:..., NS:session:... -> emb, session)."""
    kinds: dict[str, int] = {}
    for key in redis.scan_iter(count=1000):
        parts = key.decode(errors="replace").split(":")
        kind = parts[1] if len(parts) > 2 else "other"
        kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items()))


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
    redis_fds: dict[str, int] = field(default_factory=dict)  # of fds: connections to (or, for redis, from) Redis
    redis_used_memory: int | None = None  # bytes, Redis's INFO memory used_memory
    gauges: dict[str, float] = field(default_factory=dict)  # in flight: must be 0
    caches: dict[str, float] = field(default_factory=dict)  # the LLMs' prefix KV bytes, Redis's keys by kind


def take(requests: int, elapsed_s: float, pids: Mapping[str, int], metrics_ports: Mapping[str, int], redis,
         redis_port: int | None, idle_timeout_s: float) -> Sample:
    """One sample, taken once the stack is idle (or `idle_timeout_s` passed): gauges first, then memory and fds."""
    sample = Sample(requests, elapsed_s, gauges=wait_idle(metrics_ports, idle_timeout_s))
    pooled = redis_connections(redis_port) if redis_port else set()
    for name, pid in pids.items():
        rss, fds = rss_mib(pid), open_fds(pid)
        if rss is not None and fds is not None:
            sample.rss_mib[name], sample.fds[name] = round(rss, 2), fds
            sample.redis_fds[name] = sum(inode in pooled for inode in socket_inodes(pid))
    sample.caches = _read(metrics_ports, CACHE_GAUGES)
    if redis is not None:
        sample.redis_used_memory = int(redis.info("memory")["used_memory"])
        sample.caches.update({f"redis {kind} keys": n for kind, n in redis_keys(redis).items()})
    return sample
