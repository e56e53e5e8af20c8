"""The reliability tests' stack: a restartable redis-server (or a Redis Cluster), vision replicas, the LLM service and
the gateway as real processes (started in parallel), plus helpers to read their metrics, their memory and the keys
they keep in Redis.

Imported by the tests as `reliability.harness` (tests/ is on sys.path).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from internvl.gateway.v1 import gateway_pb2 as G
from internvl.gateway.v1 import gateway_pb2_grpc
from procs import REPO, free_port, redis_cluster, redis_server, spawn_service, wait_serving

from tools.launcher import Child, LocalRedisCluster, RedisServer, metric

# What no error returned to a caller may contain: tracebacks, source paths, internal addresses.
LEAK_MARKERS = ("Traceback", 'File "', "/work/", str(REPO), "127.0.0.1", "0x7f", "site-packages")
# A service of the stack (kill, restart, metric and rss_bytes are the fault and load tests' levers).
Service = Child


def start_services(stack: contextlib.ExitStack, specs: Sequence[tuple[str, str, Sequence[str]]],
                   credentials: grpc.ChannelCredentials | None = None) -> list[Service]:
    """Starts (name, command, args) services together and waits until all are SERVING (health checks over TLS with
    `credentials`); every one started is registered on `stack` for stopping, even if another fails."""
    services = []
    for name, command, args in specs:
        service = spawn_service(name, command, *args)
        stack.callback(service.stop)
        services.append(service)
    wait_serving(services, credentials=credentials)
    return services


# ------------------------------------------------------------------------------------------------------ stack


@dataclass
class Stack:
    redis: RedisServer | LocalRedisCluster
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
    """Redis, len(vision_args) vision replicas and the LLM service (started together), then the gateway.

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
        http_port = free_port() if http else None
        target = "ipv4:" + ",".join(v.address for v in visions)
        args = ["--vision-target", target, "--llm-target", f"ipv4:{llm.address}", "--redis-url", store.url,
                "--namespace", namespace, "--media-root", str(media_root),
                *(["--http-port", str(http_port)] if http_port else []), *gateway_args]
        [gateway] = start_services(stack, [("gateway", "gateway", args)])
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
