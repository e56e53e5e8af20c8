"""The reliability tests' stack: a restartable redis-server, vision replicas, the LLM service and the gateway as real
processes (started in parallel), plus helpers to read their metrics, their memory and the keys they keep in Redis.

Imported by the tests as `reliability.harness` (tests/ is on sys.path).
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
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from internvl.gateway.v1 import gateway_pb2 as G
from internvl.gateway.v1 import gateway_pb2_grpc
from procs import REPO, free_port

VISION_HEALTH = "internvl.vision.v1.VisionService"
LLM_HEALTH = "internvl.llm.v1.LLMService"
GATEWAY_HEALTH = "internvl.gateway.v1.ChatService"
# What no error returned to a caller may contain: tracebacks, source paths, internal addresses.
LEAK_MARKERS = ("Traceback", 'File "', "/work/", str(REPO), "127.0.0.1", "0x7f", "site-packages")


# ------------------------------------------------------------------------------------------------------ redis


class RedisProcess:
    """redis-server on a fixed loopback port that a test may kill and start again (same port, data lost)."""

    def __init__(self, maxmemory: str = "256mb", policy: str = "allkeys-lru"):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH; apt-get install -y redis-server")
        self.binary = binary
        self.maxmemory = maxmemory
        self.policy = policy
        self.workdir = Path(tempfile.mkdtemp(prefix="internvl-rel-redis-"))
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1, socket_timeout=5)

    def start(self, timeout_s: float = 10) -> None:
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
             "--save", "", "--appendonly", "no", "--maxmemory", self.maxmemory, "--maxmemory-policy", self.policy],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        client = self.client()
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {(self.workdir / 'redis.log').read_text()[-2000:]}")
                with contextlib.suppress(redis.exceptions.RedisError):
                    if client.ping():
                        return
                time.sleep(0.02)
        finally:
            client.close()
        raise RuntimeError("redis-server did not answer PING")

    def kill(self) -> None:
        """SIGKILL: the harshest restart (no persistence, every key is lost)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


# --------------------------------------------------------------------------------------------------- services


@dataclass
class Service:
    name: str
    process: subprocess.Popen
    port: int
    metrics_port: int
    log_path: Path
    command: str = ""
    args: tuple[str, ...] = ()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()

    def metric(self, name: str, **labels) -> float:
        return metric(self.metrics(), name, **labels)

    def rss_bytes(self) -> int:
        """Resident memory of the process now (VmRSS)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def metric(text: str, name: str, **labels) -> float:
    """One sample of Prometheus text exposition (0 when absent)."""
    selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(selector) + r"\}" if labels else "") + r" ([0-9.e+-]+|NaN)"
    found = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def spawn(name: str, command: str, *args: str, port: int | None = None, metrics_port: int | None = None) -> Service:
    port, metrics_port = port or free_port(), metrics_port or free_port()
    log_file = tempfile.NamedTemporaryFile(prefix=f"rel-{name}-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", command, "--port", str(port), "--host", "127.0.0.1",
         "--metrics-port", str(metrics_port), *args],
        cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
    log_file.close()
    return Service(name, process, port, metrics_port, Path(log_file.name), command, args)


def respawn(service: Service) -> Service:
    """The same service started again on the same ports, as Kubernetes restarts a pod behind its Service."""
    return spawn(service.name, service.command, *service.args, port=service.port, metrics_port=service.metrics_port)


def wait_serving(service: Service, health_name: str, timeout_s: float = 120,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    channel = (grpc.secure_channel(service.address, credentials) if credentials is not None
               else grpc.insecure_channel(service.address))
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if service.process.poll() is not None:
                raise RuntimeError(f"{service.name} exited with {service.process.returncode}:\n"
                                   f"{service.log_text()[-4000:]}")
            with contextlib.suppress(grpc.RpcError):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=health_name), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.1)
    raise TimeoutError(f"{service.name} not SERVING after {timeout_s}s:\n{service.log_text()[-4000:]}")


# ------------------------------------------------------------------------------------------------------ stack


@dataclass
class Stack:
    redis: RedisProcess
    visions: list[Service]
    llm: Service
    gateway: Service
    namespace: str
    media_root: Path
    http_port: int | None = None
    channel: grpc.Channel | None = None
    extra: dict = field(default_factory=dict)

    @property
    def stub(self) -> gateway_pb2_grpc.ChatServiceStub:
        return gateway_pb2_grpc.ChatServiceStub(self.channel)

    @property
    def services(self) -> list[Service]:
        return [*self.visions, self.llm, self.gateway]

    def http_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def embedding_keys(self) -> list[bytes]:
        with contextlib.closing(self.redis.client()) as client:
            return list(client.scan_iter(match=f"{self.namespace}:emb:*", count=1000))

    def wait_idle(self, timeout_s: float = 20) -> None:
        """Until the LLM runs and queues nothing and the gateway answers nothing (or fails with the gauges)."""
        deadline = time.monotonic() + timeout_s
        while True:
            llm, gw = self.llm.metrics(), self.gateway.metrics()
            values = {"llm running": metric(llm, "internvl_llm_running_sequences"),
                      "llm waiting": metric(llm, "internvl_llm_waiting_sequences"),
                      "llm running kv": metric(llm, "internvl_llm_kv_cache_usage_bytes", pool="running"),
                      "gateway in flight": sum(metric(gw, "internvl_gateway_in_flight_requests", rpc=rpc)
                                               for rpc in ("Chat", "BatchChat", "openai.chat_completions"))}
            if not any(values.values()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not idle after {timeout_s}s: {values}")
            time.sleep(0.1)


def enter_in_parallel(stack: contextlib.ExitStack, starters: Sequence[Callable[[], Service]],
                      stop: Callable[[Service], None] = Service.stop) -> list[Service]:
    """Runs the starters concurrently; every service started is registered for stopping, even if one fails."""
    with ThreadPoolExecutor(len(starters)) as pool:
        futures = [pool.submit(s) for s in starters]
    services, error = [], None
    for future in futures:
        try:
            service = future.result()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after registering the others
            error = error or exc
            continue
        stack.callback(stop, service)
        services.append(service)
    if error is not None:
        raise error
    return services


def start(name: str, command: str, args: Sequence[str], health: str,
          credentials: grpc.ChannelCredentials | None = None) -> Callable[[], Service]:
    def run() -> Service:
        service = spawn(name, command, *args)
        try:
            wait_serving(service, health, credentials=credentials)
        except BaseException:
            service.kill()
            raise
        return service

    return run


@contextlib.contextmanager
def running_stack(checkpoint: Path, *, vision_args: Sequence[Sequence[str]] = ((), ()), llm_args: Sequence[str] = (),
                  gateway_args: Sequence[str] = (), http: bool = True, redis_maxmemory: str = "256mb",
                  namespace: str = "rel") -> Iterator[Stack]:
    """Redis, len(vision_args) vision replicas and the LLM service (started together), then the gateway."""
    with contextlib.ExitStack() as stack:
        store = RedisProcess(redis_maxmemory)
        store.start()
        stack.callback(store.stop)
        media_root = Path(tempfile.mkdtemp(prefix="rel-media-"))
        stack.callback(shutil.rmtree, media_root, True)
        common = ["--model", str(checkpoint), "--dtype", "float32", "--redis-url", store.url]
        starters = [start(f"vision-{i}", "vision", [*common, "--namespace", namespace, *extra], VISION_HEALTH)
                    for i, extra in enumerate(vision_args)]
        starters.append(start("llm", "llm", [*common, *llm_args], LLM_HEALTH))
        *visions, llm = enter_in_parallel(stack, starters)
        http_port = free_port() if http else None
        target = "ipv4:" + ",".join(v.address for v in visions)
        args = ["--vision-target", target, "--llm-target", f"ipv4:{llm.address}", "--redis-url", store.url,
                "--namespace", namespace, "--media-root", str(media_root),
                *(["--http-port", str(http_port)] if http_port else []), *gateway_args]
        [gateway] = enter_in_parallel(stack, [start("gateway", "gateway", args, GATEWAY_HEALTH)])
        channel = grpc.insecure_channel(gateway.address)
        stack.callback(channel.close)
        yield Stack(store, visions, llm, gateway, namespace, media_root, http_port, channel)


# ---------------------------------------------------------------------------------------------------- requests


def text_part(value: str) -> G.ContentPart:
    return G.ContentPart(text=value)


def image_part(data: bytes) -> G.ContentPart:
    return G.ContentPart(image=G.ImageInput(data=data))


@dataclass
class Answer:
    token_ids: list[int]
    text: str
    finish: G.ChatFinish | None


def chat(stub, content, *, timeout: float = 60, metadata=None, max_new_tokens: int = 4, **fields) -> Answer:
    """One greedy Chat, gathered; raises grpc.RpcError on failure."""
    request = G.ChatRequest(content=content, **fields)
    if not request.HasField("sampling"):
        request.sampling.max_new_tokens = max_new_tokens
    ids, texts, finish = [], [], None
    for response in stub.Chat(request, timeout=timeout, metadata=metadata):
        if response.HasField("delta"):
            ids += response.delta.token_ids
            texts.append(response.delta.text)
        else:
            finish = response.finish
    return Answer(ids, "".join(texts), finish)


def assert_no_leak(message: str, *extra: str) -> None:
    for marker in (*LEAK_MARKERS, *extra):
        assert marker not in message, f"error message leaks {marker!r}: {message!r}"
