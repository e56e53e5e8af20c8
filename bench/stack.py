"""The stack under test: `internvl-serve up` as a child process, its children found by /proc, and timed clients
of the gateway's `ChatService.Chat` and the vision service's `Encode` and `FetchEmbeddings`.

Process ids and ports are read from the children themselves (a service's from the `--port-file` its command line
names, redis-server's from its `--port`), so the benchmark depends on `up`'s flags, not on the wording of its banner
beyond the line that says it is ready.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

import grpc
from internvl.common.v1 import common_pb2
from internvl.gateway.v1 import gateway_pb2 as G
from internvl.gateway.v1 import gateway_pb2_grpc
from internvl.vision.v1 import vision_pb2, vision_pb2_grpc

from bench.machine import status_mib
from tools.launcher import (
    REPO,
    UP_READY_LINE,
    cli_env,
    processes,
    read_banner,
    read_metrics,
    reported_ports,
    spawn,
)

T = TypeVar("T")
RPC_TIMEOUT_S = 3600.0
# Large enough for 16-frame videos and 4-tile PNGs.
MAX_MESSAGE_BYTES = 256 * 2**20


class StackStartError(RuntimeError):
    pass


@dataclass
class ServiceProc:
    name: str  # redis, vision-0, vision-1, llm (llm-0, llm-1, ... with several), gateway
    pid: int
    port: int | None
    metrics_port: int | None
    http_port: int | None = None


def _flag(argv: list[str], name: str) -> int | None:
    return int(argv[argv.index(name) + 1]) if name in argv else None


class RunningStack:
    """`internvl-serve up --model ... --vision-replicas N [--llm-replicas M] [--llm-routing P] [--redis-cluster K]
    [--engine E] [EXTRA_FLAGS]` until `stop()`; `http`: the gateway's OpenAI HTTP API on a free port too
    (`services["gateway"].http_port`)."""

    def __init__(self, model: str, dtype: str, replicas: int, log_dir: Path | None = None,
                 startup_timeout_s: float = 1800.0, llm_replicas: int = 1, llm_routing: str | None = None,
                 redis_cluster: int = 0, engine: str | None = None, http: bool = False,
                 extra_flags: Sequence[str] = ()):
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="internvl-bench-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.replicas = replicas
        self.llm_replicas = llm_replicas
        argv = [sys.executable, "-m", "tools.cli", "up", "--model", model, "--dtype", dtype,
                "--gateway-port", "0", "--http-port", "any" if http else "0", "--metrics-port", "0",
                "--vision-replicas", str(replicas), "--llm-replicas", str(llm_replicas),
                *(["--llm-routing", llm_routing] if llm_routing else []),
                *(["--redis-cluster", str(redis_cluster)] if redis_cluster else []),
                *(["--engine", engine] if engine else []), *extra_flags,
                "--log-dir", str(self.log_dir), "--startup-timeout", str(startup_timeout_s)]
        self.output: list[str] = []
        # Its output is read here (the banner says when it is ready); its own children log into log_dir. The token
        # is dropped so that the gateway under test requires none. It stays in this process group: a Ctrl-C of
        # the benchmark reaches it too.
        self.up = spawn("up", argv, None, cwd=REPO, env=cli_env(drop=("INTERNVL_API_TOKEN",)), tie_to_parent=True)
        self.process = self.up.process
        started = time.perf_counter()
        self.output.append(read_banner(self.process))
        if UP_READY_LINE not in self.output[-1]:
            self.process.wait(timeout=60)
            tails = "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-2000:]}"
                              for f in sorted(self.log_dir.glob("*.log")))
            raise StackStartError(f"`internvl-serve up` did not come up:\n{''.join(self.output)}\n{tails}")
        self.startup_s = time.perf_counter() - started
        # The banner's "redis: URL; logs: ..." line: the one Redis, or the cluster, every service uses.
        found = re.search(r"^redis: (\S+);", "".join(self.output), re.MULTILINE)
        self.redis_url = found.group(1) if found else None
        # Keep draining up's stdout so it never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()
        self.services = self._find_services()
        self.gateway_port = self.services["gateway"].port
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.gateway_port}", options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        self.chat = gateway_pb2_grpc.ChatServiceStub(self.channel)

    def _drain(self) -> None:
        for line in self.process.stdout:
            self.output.append(line)

    def _find_services(self) -> dict[str, ServiceProc]:
        found: dict[str, ServiceProc] = {}
        visions, llms = [], []
        for child in (p for p in processes() if p.ppid == self.process.pid):
            pid, argv = child.pid, child.argv
            joined = " ".join(argv)
            # Every service has reported its ports by now: up prints its banner once they all serve.
            ports = reported_ports(argv) or {}
            port, metrics = ports.get("port", _flag(argv, "--port")), ports.get("metrics_port")
            if "redis-server" in joined:
                found["redis"] = ServiceProc("redis", pid, port, None)
            elif "tools.cli" in argv or "tools/cli.py" in joined:
                role = next((r for r in ("vision", "llm", "gateway") if r in argv), None)
                if role == "vision":
                    visions.append(ServiceProc("vision", pid, port, metrics))
                elif role == "llm":
                    llms.append(ServiceProc("llm", pid, port, metrics))
                elif role:
                    found[role] = ServiceProc(role, pid, port, metrics, ports.get("http_port"))
        for i, proc in enumerate(sorted(visions, key=lambda p: p.pid)):
            proc.name = f"vision-{i}"
            found[proc.name] = proc
        for i, proc in enumerate(sorted(llms, key=lambda p: p.pid)):
            proc.name = "llm" if len(llms) == 1 else f"llm-{i}"
            found[proc.name] = proc
        missing = {"gateway", *self.llm_names, *(f"vision-{i}" for i in range(self.replicas))} - set(found)
        if missing:
            raise StackStartError(f"cannot find the stack's processes {sorted(missing)} under pid {self.process.pid}")
        return found

    @property
    def llm_names(self) -> list[str]:
        """The LLM replicas' names in `services`: `llm`, or `llm-0`, `llm-1`, ... when there are several."""
        return ["llm"] if self.llm_replicas == 1 else [f"llm-{i}" for i in range(self.llm_replicas)]

    @property
    def pids(self) -> dict[str, int]:
        return {name: s.pid for name, s in self.services.items()}

    def rss_mib(self) -> dict[str, float | None]:
        return {name: status_mib(s.pid) for name, s in self.services.items()}

    def metrics(self, name: str) -> str:
        return read_metrics(self.services[name].metrics_port)

    def vision_stub(self, index: int = 0) -> vision_pb2_grpc.VisionServiceStub:
        channel = grpc.insecure_channel(f"127.0.0.1:{self.services[f'vision-{index}'].port}", options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        return vision_pb2_grpc.VisionServiceStub(channel)

    def stop(self) -> None:
        self.channel.close()
        tree = descendants(self.process.pid)
        # SIGINT is up's Ctrl-C: it stops its children in order.
        self.up.stop(grace_s=120, sig=signal.SIGINT)
        kill_stragglers(tree)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def descendants(pid: int) -> list[int]:
    """Every process under `pid` now (children, theirs, ...)."""
    table = processes()
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [p.pid for p in table if p.ppid == parent]
        found += children
        frontier += children
    return found


def kill_stragglers(pids: list[int]) -> None:
    """SIGKILL to those of `pids` still alive after their parent stopped: an engine process a stopped server left
    behind (vLLM's engine core outlives a parent killed after its grace period) would hold gigabytes for the rest of
    the run."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of one metric in Prometheus text format whose label sets include `labels` (none given: all
    of them); 0 when absent."""
    total = 0.0
    for match in re.finditer(r"^" + re.escape(name) + r"(?:\{([^}]*)\})? ([0-9.eE+-]+)$", text, re.MULTILINE):
        found = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def redis_client(url: str):
    """A synchronous client of the stack's Redis: one server (`redis://`) or a cluster (`redis+cluster://`)."""
    import redis
    import redis.cluster

    from services.runtime.redis_cluster import is_cluster_url, parse_cluster_url

    if is_cluster_url(url):
        nodes = [redis.cluster.ClusterNode(host, port) for host, port in parse_cluster_url(url).nodes]
        return redis.cluster.RedisCluster(startup_nodes=nodes, socket_timeout=30)
    return redis.Redis.from_url(url, socket_timeout=30)


# ------------------------------------------------------------------------------------------------- clients


@dataclass
class ChatTiming:
    started: float
    # (monotonic time, tokens in that delta) for every delta that carried tokens.
    deltas: list[tuple[float, int]] = field(default_factory=list)
    finished: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    usage: dict = field(default_factory=dict)
    session_id: str = ""

    @property
    def ttft_s(self) -> float:
        return self.deltas[0][0] - self.started

    @property
    def total_s(self) -> float:
        return self.finished - self.started

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    def decode_step_s(self) -> float:
        """Mean time per token after the first delta: (last delta's arrival - first's) / tokens of later deltas."""
        later = sum(n for _, n in self.deltas[1:])
        if later == 0:
            return float("nan")
        return (self.deltas[-1][0] - self.deltas[0][0]) / later


def image_part(data: bytes) -> G.ContentPart:
    return G.ContentPart(image=G.ImageInput(data=data))


def text_part(text: str) -> G.ContentPart:
    return G.ContentPart(text=text)


def video_part(data: bytes, frames: int) -> G.ContentPart:
    return G.ContentPart(video=G.VideoInput(data=data, num_segments=frames))


def chat(stub: gateway_pb2_grpc.ChatServiceStub, content: list[G.ContentPart], max_new_tokens: int,
         session_id: str | None = None, max_num: int | None = None, started: float | None = None) -> ChatTiming:
    """One greedy streamed Chat, timed from `started` (default: now) to the finish message."""
    request = G.ChatRequest(content=content, sampling=G.SamplingParams(max_new_tokens=max_new_tokens))
    if session_id:
        request.session_id = session_id
    if max_num is not None:
        request.max_num = max_num
    timing = ChatTiming(started=started if started is not None else time.perf_counter())
    for response in stub.Chat(request, timeout=RPC_TIMEOUT_S):
        now = time.perf_counter()
        if response.HasField("delta"):
            if response.delta.token_ids:
                timing.deltas.append((now, len(response.delta.token_ids)))
                timing.token_ids.extend(response.delta.token_ids)
        else:
            timing.finished = now
            u = response.finish.usage
            timing.usage = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                            "cached_prompt_tokens": u.cached_prompt_tokens, "image_tiles": list(u.image_tiles),
                            "encoded_tiles": u.encoded_tiles, "reused_tiles": u.reused_tiles}
            timing.session_id = response.finish.session_id
    if not timing.finished:
        timing.finished = time.perf_counter()
    return timing


def encode(stub: vision_pb2_grpc.VisionServiceStub, data: bytes | list[bytes], max_num: int,
           use_thumbnail: bool | None = None) -> tuple[float, list]:
    """(seconds, items) of one vision `Encode` of one image (or of several, in one call). `use_thumbnail=True` is
    what the gateway asks for, so the keys are the ones a Chat about the same image looks up."""
    images = [data] if isinstance(data, bytes) else data
    options = common_pb2.PreprocessOptions(max_num=max_num)
    if use_thumbnail is not None:
        options.use_thumbnail = use_thumbnail
    request = vision_pb2.EncodeRequest(items=[vision_pb2.EncodeItem(image_bytes=d) for d in images], options=options)
    started = time.perf_counter()
    reply = stub.Encode(request, timeout=RPC_TIMEOUT_S)
    return time.perf_counter() - started, list(reply.items)


def lookup(stub: vision_pb2_grpc.VisionServiceStub, keys: list[str]) -> list[bool]:
    """Which of `keys` the stack's cache holds now (vision `Lookup`)."""
    return list(stub.Lookup(vision_pb2.LookupRequest(keys=keys), timeout=RPC_TIMEOUT_S).exists)


def fetch_embeddings(stub: vision_pb2_grpc.VisionServiceStub, key: str) -> tuple[float, int]:
    """(seconds, bytes) of one vision `FetchEmbeddings` of a cached key: the service reads the value from Redis,
    checks it and streams the tensor in chunks; timed until the last chunk has arrived."""
    started = time.perf_counter()
    size = sum(len(reply.chunk.data) for reply in stub.FetchEmbeddings(
        vision_pb2.FetchEmbeddingsRequest(key=key), timeout=RPC_TIMEOUT_S))
    return time.perf_counter() - started, size


def in_threads(fn: Callable[[int], T], n: int) -> list[T]:
    """`fn(0)` ... `fn(n - 1)`, each on a thread of its own, all started at once; their results in order (the first
    error is re-raised here, after every thread has ended)."""
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised below on the calling thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results
