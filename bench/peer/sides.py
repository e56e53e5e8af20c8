"""The three systems the peer benchmark compares, each behind an OpenAI chat-completions endpoint:

- `vllm` (a): `vllm serve` on the checkpoint (`vllm_serve`); with several replicas, each its own `vllm serve`, behind
  the round-robin proxy (`round_robin`);
- `ours-vllm` (b): our stack, `internvl-serve up --engine vllm` (vision service, Redis, LLM service(s) on vLLM's
  engine, gateway with affinity routing), through the gateway's OpenAI HTTP API;
- `ours-transformers` (c): the same stack with the transformers engine.

Every vLLM side gets the same KV pool per replica (`Workload.peer_kv_mib`: `--kv-cache-memory-bytes` for `vllm
serve`; `--kv-budget-mb` plus `--kv-cache-budget-mb`, half each, for our vLLM engine, whose pool is their sum) and
eager mode on a CPU (our vLLM engine always runs eager there). The transformers engine keeps its own defaults.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.machine import status_mib
from bench.peer.chat_template import write_chat_template
from bench.peer.openai_stream import Endpoint
from bench.peer.round_robin import RoundRobinProxy
from bench.peer.vllm_serve import VllmServe
from bench.settings import BenchSettings
from bench.stack import RunningStack, StackStartError, descendants
from services.llm.engine.memory import free_memory_bytes
from services.model.checkpoint import open_checkpoint

log = logging.getLogger("bench")

LABELS = {"vllm": "vllm serve", "ours-vllm": "ours (vLLM engine)", "ours-transformers": "ours (transformers engine)"}
ENGINES = {"ours-vllm": "vllm", "ours-transformers": "transformers"}


@dataclass
class Side:
    """One system, up until `stop()`: its endpoint (the proxy's with several `vllm serve` replicas), whether it keeps
    sessions (ours), and what it runs on."""

    name: str
    replicas: int
    endpoint: Endpoint
    startup_s: float
    serves: list[VllmServe] = field(default_factory=list)
    proxy: RoundRobinProxy | None = None
    stack: RunningStack | None = None

    @property
    def label(self) -> str:
        return LABELS[self.name]

    @property
    def sessions(self) -> bool:
        return self.stack is not None

    def rss_mib(self) -> float:
        if self.stack is not None:
            return sum(v or 0.0 for v in self.stack.rss_mib().values()) + sum(
                status_mib(pid) or 0.0 for pid in _vllm_children(self.stack))
        return sum(serve.rss_mib() for serve in self.serves)

    def describe(self) -> dict[str, Any]:
        """What the report says about how it ran: its command lines and what vLLM logged about its settings."""
        out: dict[str, Any] = {"label": self.label, "replicas": self.replicas, "startup_s": self.startup_s}
        if self.serves:
            out["argv"] = self.serves[0].argv[1:]
            out["thread_binding"] = self.serves[0].log_line("core ids=")
            out["kv_cache"] = self.serves[0].log_line("KV cache size")
        if self.stack is not None:
            out["log_dir"] = str(self.stack.log_dir)
        return out

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        for serve in self.serves:
            serve.stop()
        if self.stack is not None:
            self.stack.stop()


def _vllm_children(stack: RunningStack) -> list[int]:
    """vLLM's engine processes under our LLM services (their RSS is not in the services' own)."""
    return [pid for name in stack.llm_names for pid in descendants(stack.services[name].pid)]


def start_vllm(s: BenchSettings, model: str, replicas: int) -> Side:
    """`replicas` x `vllm serve`, started one after the other (each loads while the others wait), and the proxy when
    there are several."""
    workdir = Path(tempfile.mkdtemp(prefix="internvl-bench-vllm-"))
    chat_template = write_chat_template(workdir / "internvl2_5.jinja", open_checkpoint(model).spec.system_message)
    serves: list[VllmServe] = []
    try:
        for i in range(replicas):
            log.info("peer: starting vllm serve %d/%d (logs in %s)", i + 1, replicas, workdir)
            serves.append(VllmServe(model, f"vllm-serve-{i}", chat_template, workdir, dtype=s.dtype,
                                    kv_cache_bytes=s.workload.peer_kv_mib * 2**20, device=s.device,
                                    startup_timeout_s=s.startup_timeout_s))
    except BaseException:
        for serve in serves:
            serve.stop()
        raise
    startup = sum(serve.startup_s for serve in serves)
    if replicas == 1:
        return Side("vllm", 1, serves[0].endpoint, startup, serves=serves)
    proxy = RoundRobinProxy([serve.endpoint for serve in serves])
    return Side("vllm", replicas, proxy.endpoint, startup, serves=serves, proxy=proxy)


def start_ours(s: BenchSettings, model: str, name: str, replicas: int) -> Side:
    """Our stack with one vision replica, `replicas` LLM replicas (affinity routing) and the engine of `name`."""
    engine = ENGINES[name]
    half = s.workload.peer_kv_mib / 2
    flags = ["--kv-budget-mb", f"{half:g}", "--kv-cache-budget-mb", f"{half:g}"] if engine == "vllm" else []
    log.info("peer: starting `internvl-serve up --engine %s --llm-replicas %d` %s", engine, replicas, " ".join(flags))
    options = {"startup_timeout_s": s.startup_timeout_s, "llm_replicas": replicas, "llm_routing": "affinity",
                   "engine": engine, "http": True, "extra_flags": flags}
    try:
        stack = RunningStack(model, s.dtype, 1, **options)
    except StackStartError as exc:
        # `up` picks redis-server's port by binding and releasing it; another process may take it in between.
        log.warning("stack did not start, trying once more: %s", str(exc)[-500:])
        stack = RunningStack(model, s.dtype, 1, **options)
    endpoint = Endpoint(model=Path(model).name, port=stack.services["gateway"].http_port)
    return Side(name, replicas, endpoint, stack.startup_s, stack=stack)


class MemoryShortError(RuntimeError):
    """Starting a side would leave the machine without memory (it would be killed, or kill another's process)."""


# Resident memory per replica beyond the KV pool, as multiples of the checkpoint's size plus a fixed part (the
# processes' Python, torch and vLLM). Measured at the 1B shape (a 1.75 GiB checkpoint, bf16): vllm serve 6.0 GiB
# (API server 1.0, engine core 0.7, worker 4.3: vLLM's CPU worker holds its weights about twice), our LLM service on
# vLLM's engine 7.2 GiB (service 1.6, engine core 1.2, worker 4.4) and the vision service 1.0 GiB once per stack,
# our LLM service on the transformers engine 1.7 GiB.
ESTIMATE = {"vllm": (2.5, 1.8), "ours-vllm": (2.6, 2.6), "ours-transformers": (1.0, 1.2)}
MARGIN_MIB = 1024


def needed_mib(s: BenchSettings, model: str, name: str, replicas: int, measured_one: float | None) -> float:
    """What `replicas` replicas of side `name` will hold: the RSS measured for one in this run, or the estimate."""
    if measured_one:
        return replicas * measured_one
    factor, fixed_gib = ESTIMATE[name]
    weights_mib = sum(f.stat().st_size for f in Path(open_checkpoint(model).path).glob("*.safetensors")) / 2**20
    kv = s.workload.peer_kv_mib if name != "ours-transformers" else 0
    return replicas * (factor * weights_mib + kv + fixed_gib * 1024)


def check_memory(s: BenchSettings, model: str, name: str, replicas: int, measured_one: float | None = None) -> None:
    """Raises MemoryShortError unless the memory available now holds the side and a margin."""
    need = needed_mib(s, model, name, replicas, measured_one)
    available = free_memory_bytes(torch.device("cpu")) / 2**20
    if s.device == "cpu" and available < need + MARGIN_MIB:
        raise MemoryShortError(f"{LABELS[name]} x {replicas} needs about {need / 1024:.1f} GiB; "
                               f"{available / 1024:.1f} GiB are available")


class MemoryWatchdog:
    """While the sides are up: if the memory available falls below `floor_mib` (other work on a shared machine grew),
    SIGTERM to this process, which stops every side and keeps the finished phases (`--resume` continues), before the
    kernel's OOM killer picks a process, perhaps someone else's."""

    def __init__(self, floor_mib: float = 512.0, interval_s: float = 2.0):
        self.floor_mib, self.interval_s = floor_mib, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="memory-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            available = free_memory_bytes(torch.device("cpu")) / 2**20
            if available < self.floor_mib:
                log.error("peer: only %.0f MiB of memory left; stopping the run (resume it with --resume)", available)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    def stop(self) -> None:
        self._stop.set()


def start(s: BenchSettings, model: str, name: str, replicas: int, measured_one: float | None = None) -> Side:
    """The side, once `check_memory` allows it."""
    check_memory(s, model, name, replicas, measured_one)
    return start_vllm(s, model, replicas) if name == "vllm" else start_ours(s, model, name, replicas)
