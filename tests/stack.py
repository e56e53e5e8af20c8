"""The stacks of the end-to-end tests, built in one place.

`up_stack`: the whole stack as `make run` starts it, `internvl-serve up` with its banner read back (its addresses and
metrics ports), a failure to start reported with the tails of every log, and Ctrl-C checked to stop every process.
`running_stack`: Redis, vision replicas, the LLM service and the gateway started one by one as processes of the test,
with the flags a test needs, so that a test can kill, restart and read each. `start_services`: any set of services,
started together and waited for.

Every service binds port 0 and reports the port it got (tools.launcher), so a busy machine cannot take a port from
under a stack.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from internvl.gateway.v1 import gateway_pb2_grpc
from procs import REPO, redis_cluster, redis_server, spawn_service, stop_together, wait_serving

from tools.launcher import (
    UP_READY_LINE,
    Child,
    LocalRedisCluster,
    RedisServer,
    cli_env,
    metric,
    processes,
    read_banner,
    read_metrics,
    spawn,
)

# How much of each log a failure to start shows.
LOG_TAIL_CHARS = 3000


# ---------------------------------------------------------------------------------------------------------- up


@dataclass
class UpStack:
    """A running `internvl-serve up`: what its banner says, and the process."""

    process: subprocess.Popen
    banner: str
    logs: Path
    port: int  # the gateway's gRPC port
    http_port: int | None
    metrics_ports: dict[str, int]  # gateway, vision-0, ..., llm (or llm-0, llm-1, ...) -> /metrics port
    model: str  # the base model's id (the checkpoint directory's name), what the OpenAI `model` field names
    channel: grpc.Channel

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def stub(self) -> gateway_pb2_grpc.ChatServiceStub:
        return gateway_pb2_grpc.ChatServiceStub(self.channel)

    def metrics(self, name: str = "gateway") -> str:
        return read_metrics(self.metrics_ports[name])


def _parse_banner(banner: str) -> dict:
    """The gateway's ports and every process's metrics port, from up's banner."""
    port = re.search(r"ChatService\) on \S+:(\d+)$", banner, re.MULTILINE)
    http = re.search(r"^OpenAI-compatible API on http://\S+:(\d+)/v1$", banner, re.MULTILINE)
    metrics_line = re.search(r"^metrics: (.*)$", banner, re.MULTILINE)
    assert port and metrics_line, banner
    metrics = {name: int(p) for name, p in re.findall(r"(\S+) http://\S+:(\d+)/metrics", metrics_line.group(1))}
    return {"port": int(port.group(1)), "http_port": int(http.group(1)) if http else None, "metrics_ports": metrics}


def processes_mentioning(text: str) -> list[int]:
    """Processes of this machine (but this one) whose command line holds `text`."""
    return [p.pid for p in processes() if p.pid != os.getpid() and text in " ".join(p.argv)]


def descendants(pid: int) -> set[tuple[int, str]]:
    """Every process below `pid` now, as (pid, command line): a pid reused later by another program is not taken for
    one of them. Found by parent links, so also processes that renamed themselves (vLLM's engine core and workers)."""
    children: dict[int, list] = {}
    for p in processes():
        children.setdefault(p.ppid, []).append(p)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add((child.pid, " ".join(child.argv)))
            todo.append(child.pid)
    return found


def still_running(started: set[tuple[int, str]], grace_s: float = 10) -> list[tuple[int, str]]:
    """Those of `started` (from `descendants`) that still run after up to `grace_s` (an orphan that was told to
    stop may take a moment to exit)."""
    deadline = time.monotonic() + grace_s
    while True:
        running = sorted(started & {(p.pid, " ".join(p.argv)) for p in processes()})
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.2)


@contextlib.contextmanager
def up_stack(checkpoint: Path, logs: Path, *args: str, http: bool = True, cli_flags: Sequence[str] = (),
             env: Mapping[str, str] | None = None, drop_env: Sequence[str] = ()) -> Iterator[UpStack]:
    """`internvl-serve [CLI_FLAGS] up --model CHECKPOINT --dtype float32 ARGS...` on ports of its own choosing
    (printed in its banner; no HTTP API without `http`), logging into `logs`, its environment this one's with `env`
    added and `drop_env` removed; yielded once its banner says every process serves.

    A failure to start fails the test with the banner and the tail of every log. Leaving, it gets SIGINT (Ctrl-C),
    which must stop it with status 0 and leave no process behind: none it had started (the services and what they
    started, vLLM's engine processes among them), none naming the log directory (redis-server's directory, the
    services' port files) or the checkpoint (the services).
    """
    argv = [sys.executable, "-m", "tools.cli", *cli_flags, "up", "--model", str(checkpoint), "--dtype", "float32",
            "--gateway-port", "0", "--http-port", "any" if http else "0", "--metrics-port", "0",
            "--log-dir", str(logs), *args]
    up = spawn("up", argv, None, cwd=REPO, env=cli_env(env, drop=drop_env)).process
    banner = read_banner(up)
    if UP_READY_LINE not in banner:
        up.kill()
        up.wait()
        tails = "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-LOG_TAIL_CHARS:]}"
                          for f in sorted(logs.glob("*.log")))
        pytest.fail(f"`internvl-serve up` did not come up:\n{banner}\n{tails}", pytrace=False)
    ports = _parse_banner(banner)
    channel = grpc.insecure_channel(f"127.0.0.1:{ports['port']}")
    try:
        yield UpStack(up, banner, logs, model=checkpoint.name, channel=channel, **ports)
    finally:
        channel.close()
        started = descendants(up.pid)
        up.send_signal(signal.SIGINT)
        rest, _ = up.communicate(timeout=90)
    assert up.returncode == 0 and "stopped" in rest, rest
    assert still_running(started) == [], "a process `up` had started outlived it"
    assert processes_mentioning(str(logs)) == [], "a process of the stack (redis-server?) outlived `up`"
    assert processes_mentioning(str(checkpoint)) == [], "a service outlived `up`"


# ---------------------------------------------------------------------------------------------------- services


def start_services(stack: contextlib.ExitStack, specs: Sequence[tuple[str, str, Sequence[str]]],
                   credentials: grpc.ChannelCredentials | None = None, timeout_s: float = 120) -> list[Child]:
    """Starts (name, command, args) services together and waits until all are SERVING (health checks over TLS with
    `credentials`); every one started is stopped with the others when `stack` closes, even if another failed."""
    services: list[Child] = []
    stack.callback(stop_together, services)  # side by side, as many as have started
    for name, command, args in specs:
        services.append(spawn_service(name, command, *args))
    wait_serving(services, timeout_s, credentials=credentials)
    return list(services)


@dataclass
class Stack:
    """A stack of the test's own processes (see `running_stack`); each can be killed, restarted and read."""

    redis: RedisServer | LocalRedisCluster
    visions: list[Child]
    llm: Child
    gateway: Child
    namespace: str
    media_root: Path
    channel: grpc.Channel
    extra: dict = field(default_factory=dict)

    @property
    def stub(self) -> gateway_pb2_grpc.ChatServiceStub:
        return gateway_pb2_grpc.ChatServiceStub(self.channel)

    @property
    def services(self) -> list[Child]:
        return [*self.visions, self.llm, self.gateway]

    @property
    def http_port(self) -> int | None:
        return self.gateway.http_port

    def http_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def embedding_keys(self) -> list[bytes]:
        """Every embedding key of the stack now (on a cluster: from every master)."""
        return self.redis.scan_keys(f"{self.namespace}:emb:*")

    def wait_idle(self, timeout_s: float = 20) -> None:
        """Until the LLM runs and queues nothing and the gateway answers nothing (or fails with the gauges)."""
        deadline = time.monotonic() + timeout_s
        while True:
            llm, gw = self.llm.metrics(), self.gateway.metrics()
            values = {"llm running": metric(llm, "internvl_llm_running_sequences"),
                      "llm waiting": metric(llm, "internvl_llm_waiting_sequences"),
                      "llm running kv": metric(llm, "internvl_llm_kv_cache_usage_bytes", pool="running"),
                      "gateway in flight": sum(metric(gw, "internvl_gateway_in_flight_requests", method=method)
                                               for method in ("Chat", "BatchChat", "openai.chat_completions"))}
            if not any(values.values()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not idle after {timeout_s}s: {values}")
            time.sleep(0.1)


@contextlib.contextmanager
def running_stack(checkpoint: Path, *, vision_args: Sequence[Sequence[str]] = ((), ()), llm_args: Sequence[str] = (),
                  gateway_args: Sequence[str] = (), http: bool = True, redis_maxmemory: str = "256mb",
                  redis_cluster_masters: int = 0, redis_cluster_replicas: int = 0,
                  namespace: str = "rel") -> Iterator[Stack]:
    """Redis, len(vision_args) vision replicas and the LLM service (started together), then the gateway (with its
    HTTP API unless not `http`), on the checkpoint in float32.

    Redis is one redis-server, or with `redis_cluster_masters` a Redis Cluster of that many masters with
    `redis_cluster_replicas` replicas each (every service then gets its `redis+cluster://` URL)."""
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(
            redis_cluster(redis_cluster_masters, redis_cluster_replicas, redis_maxmemory) if redis_cluster_masters
            else redis_server(redis_maxmemory))
        media_root = Path(tempfile.mkdtemp(prefix="rel-media-"))
        stack.callback(shutil.rmtree, media_root, True)
        common = ["--model", str(checkpoint), "--dtype", "float32", "--redis-url", store.url]
        specs = [(f"vision-{i}", "vision", [*common, "--namespace", namespace, *extra])
                 for i, extra in enumerate(vision_args)]
        *visions, llm = start_services(stack, [*specs, ("llm", "llm", [*common, *llm_args])])
        target = "ipv4:" + ",".join(v.address for v in visions)
        args = ["--vision-target", target, "--llm-target", f"ipv4:{llm.address}", "--redis-url", store.url,
                "--namespace", namespace, "--media-root", str(media_root),
                *(["--http-port", "0"] if http else []), *gateway_args]
        [gateway] = start_services(stack, [("gateway", "gateway", args)])
        channel = grpc.insecure_channel(gateway.address)
        stack.callback(channel.close)
        yield Stack(store, visions, llm, gateway, namespace, media_root, channel)
