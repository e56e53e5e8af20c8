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
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.machine import status_mib
from bench.peer.chat_template import write_chat_template
from bench.peer.openai_stream import Endpoint
from bench.peer.round_robin import RoundRobinProxy
from bench.peer.vllm_serve import VllmServe
from bench.settings import BenchSettings
from bench.stack import RunningStack, StackStartError, descendants
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


def start(s: BenchSettings, model: str, name: str, replicas: int) -> Side:
    return start_vllm(s, model, replicas) if name == "vllm" else start_ours(s, model, name, replicas)
