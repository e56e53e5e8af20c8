"""`internvl-serve up`: the whole stack on this machine, as separate processes, until Ctrl-C.

Starts Redis (a private `redis-server` child unless `--redis-url` is given), the vision service (`--vision-replicas`
of them), the LLM service and the gateway, each as its own process, waits until each reports SERVING on
grpc.health.v1, prints the addresses and an example `internvl-chat` call, and serves until SIGINT/SIGTERM. Then it
stops them in reverse order (the gateway drains its streams before the services behind it stop), each with SIGTERM
and a grace period. Children run in their own process group, so Ctrl-C reaches only this supervisor, which orders the
shutdown; they also get SIGTERM if the supervisor dies.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import InternVLError

GATEWAY_HEALTH = "internvl.gateway.v1.ChatService"
VISION_HEALTH = "internvl.vision.v1.VisionService"
LLM_HEALTH = "internvl.llm.v1.LLMService"
# Each service drains for up to 30 s (its --drain-seconds) after SIGTERM; then it is killed.
STOP_GRACE_S = 45.0


class StackError(InternVLError):
    """A part of the stack failed to start; the message names it and shows its log's tail."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (original OpenGVLab format) or hub id")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="compute dtype of both services (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the gateway binds (default 127.0.0.1; the services behind it always "
                             "bind 127.0.0.1)")
    parser.add_argument("--gateway-port", type=int, default=50051, help="gateway gRPC port (default 50051)")
    parser.add_argument("--http-port", type=int, default=8000,
                        help="OpenAI-compatible HTTP port (default 8000; 0: none)")
    parser.add_argument("--metrics-port", type=int, default=9100,
                        help="gateway /metrics port (default 9100); the services get free ports, printed at start")
    parser.add_argument("--redis-url", default=None, help="use this Redis instead of starting redis-server")
    parser.add_argument("--vision-replicas", type=int, default=1,
                        help="vision processes; the gateway round-robins over them (default 1)")
    parser.add_argument("--media-root", default=None, help="directory requests may name files in (gateway)")
    parser.add_argument("--log-dir", default=None, help="where the processes' logs go (default: a temp directory)")
    parser.add_argument("--startup-timeout", type=float, default=900.0,
                        help="seconds to wait for each process to become ready (default 900)")
    tls = parser.add_argument_group("TLS (default: plaintext everywhere)")
    tls.add_argument("--tls-cert", default=None,
                     help="PEM certificate every server presents (it must name 127.0.0.1 and the gateway's --host); "
                          "with --tls-client-ca the gateway also presents it to the services, so it needs the "
                          "clientAuth usage too")
    tls.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    tls.add_argument("--tls-ca", default=None, help="PEM CA that signed --tls-cert (the gateway and the health "
                                                    "checks trust it)")
    tls.add_argument("--tls-client-ca", default=None,
                     help="PEM CA; the vision and LLM services then require client certificates it signed (mTLS)")
    parser.add_argument("--api-token-file", default=None,
                        help="file holding the bearer token the gateway requires (default: none)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


try:
    # Loaded here, not in the forked child: a parent with threads (the benchmark's gRPC) must not dlopen after fork.
    _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # pragma: no cover - not glibc
    _LIBC = None


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """`preexec_fn` for Linux: the child gets SIGTERM when its parent dies, even by SIGKILL. The "parent" is the
    thread that spawned it, so spawn from a thread that lives as long as the child should."""
    if _LIBC is not None:
        with contextlib.suppress(Exception):
            _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log_path: Path
    port: int | None = None
    metrics_port: int | None = None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Stack:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.children: list[Child] = []
        self.log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="internvl-up-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def spawn(self, name: str, argv: list[str], port: int | None = None, metrics_port: int | None = None) -> Child:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True,
                                       # The supervisor is single-threaded when it spawns.
                                       preexec_fn=die_with_parent)  # noqa: PLW1509
        child = Child(name, process, log_path, port, metrics_port)
        self.children.append(child)
        return child

    def service(self, name: str, command: str, port: int, *extra: str, host: str = "127.0.0.1",
                metrics_port: int | None = None) -> Child:
        metrics_port = metrics_port or free_port()
        argv = [sys.executable, "-m", "services.cli", command, "--port", str(port), "--host", host,
                "--metrics-port", str(metrics_port), *extra]
        return self.spawn(name, argv, port, metrics_port)

    def start_redis(self) -> str:
        binary = shutil.which("redis-server")
        if binary is None:
            raise StackError("redis-server is not installed (apt-get install redis-server), or pass --redis-url")
        port = free_port()
        child = self.spawn("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.log_dir),
                                     "--save", "", "--appendonly", "no", "--maxmemory", "1gb",
                                     # Embeddings are a cache: evict the least recently used under pressure.
                                     "--maxmemory-policy", "allkeys-lru"])
        import redis

        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=0.5)
        deadline = time.monotonic() + 15
        try:
            while time.monotonic() < deadline:
                if child.process.poll() is not None:
                    raise StackError(f"redis-server exited at start:\n{child.log_tail()}")
                with contextlib.suppress(redis.exceptions.RedisError):
                    if client.ping():
                        return f"redis://127.0.0.1:{port}/0"
                time.sleep(0.05)
        finally:
            client.close()
        raise StackError(f"redis-server did not answer PING:\n{child.log_tail()}")

    def tls_server_args(self, mutual: bool) -> list[str]:
        """The TLS flags of a server (none without --tls-cert); `mutual`: require client certificates."""
        a = self.args
        if not a.tls_cert:
            return []
        out = ["--tls-cert", a.tls_cert, "--tls-key", a.tls_key]
        return out + ["--tls-client-ca", a.tls_client_ca] if mutual and a.tls_client_ca else out

    def tls_upstream_args(self) -> list[str]:
        a = self.args
        if not a.tls_cert:
            return []
        out = ["--upstream-tls-ca", a.tls_ca] if a.tls_ca else []
        return out + (["--upstream-tls-cert", a.tls_cert, "--upstream-tls-key", a.tls_key] if a.tls_client_ca else [])

    def channel(self, address: str):
        """A health-check channel to one of the children (TLS, with the client certificate, when configured)."""
        import grpc

        from services.common.tls import ClientTls

        a = self.args
        if not a.tls_cert:
            return grpc.insecure_channel(address)
        tls = ClientTls.from_files(a.tls_ca, a.tls_cert if a.tls_client_ca else None,
                                   a.tls_key if a.tls_client_ca else None)
        return grpc.secure_channel(address, (tls or ClientTls()).credentials())

    def wait_serving(self, children: list[Child], health_name: dict[str, str], stopping) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + self.args.startup_timeout
        waiting = list(children)
        channels = {c.name: self.channel(f"127.0.0.1:{c.port}") for c in waiting}
        try:
            while waiting:
                if stopping():
                    raise KeyboardInterrupt
                for child in list(waiting):
                    if child.process.poll() is not None:
                        raise StackError(f"{child.name} exited with {child.process.returncode} while starting; its "
                                         f"log ({child.log_path}) ends:\n{child.log_tail()}")
                    stub = health_pb2_grpc.HealthStub(channels[child.name])
                    with contextlib.suppress(grpc.RpcError):
                        reply = stub.Check(health_pb2.HealthCheckRequest(service=health_name[child.name]),
                                           timeout=1)
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            waiting.remove(child)
                            print(f"  {child.name} ready on 127.0.0.1:{child.port}", flush=True)
                if time.monotonic() > deadline:
                    raise StackError(f"{', '.join(c.name for c in waiting)} not ready after "
                                     f"{self.args.startup_timeout:.0f}s; logs in {self.log_dir}")
                time.sleep(0.2)
        finally:
            for channel in channels.values():
                channel.close()

    def stop_all(self) -> None:
        """Reverse start order: the gateway drains first, Redis goes last."""
        for child in reversed(self.children):
            child.stop()


def run(args: argparse.Namespace) -> int:
    if args.vision_replicas < 1:
        raise StackError("--vision-replicas must be >= 1")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise StackError("--tls-cert and --tls-key go together")
    if (args.tls_ca or args.tls_client_ca) and not args.tls_cert:
        raise StackError("--tls-ca and --tls-client-ca need --tls-cert and --tls-key")
    stop_requested = []

    def on_signal(signum, frame):
        stop_requested.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    stack = Stack(args)
    print(f"starting InternVL stack for {args.model} (logs in {stack.log_dir})", flush=True)
    try:
        redis_url = args.redis_url or stack.start_redis()
        common = ["--model", args.model, "--redis-url", redis_url, *(["--dtype", args.dtype] if args.dtype else [])]
        internal = [*common, *stack.tls_server_args(mutual=True)]
        visions = [stack.service(f"vision-{i}", "vision", free_port(), *internal)
                   for i in range(args.vision_replicas)]
        llm = stack.service("llm", "llm", free_port(), *internal)
        health = {**{v.name: VISION_HEALTH for v in visions}, "llm": LLM_HEALTH, "gateway": GATEWAY_HEALTH}
        stack.wait_serving([*visions, llm], health, lambda: bool(stop_requested))
        vision_target = "ipv4:" + ",".join(f"127.0.0.1:{v.port}" for v in visions)
        gateway_args = ["--vision-target", vision_target, "--llm-target", f"ipv4:127.0.0.1:{llm.port}",
                        "--redis-url", redis_url]
        if args.http_port:
            gateway_args += ["--http-port", str(args.http_port)]
        if args.media_root:
            gateway_args += ["--media-root", args.media_root]
        if args.api_token_file:
            gateway_args += ["--api-token-file", args.api_token_file]
        gateway_args += [*stack.tls_server_args(mutual=False), *stack.tls_upstream_args()]
        gateway = stack.service("gateway", "gateway", args.gateway_port, *gateway_args, host=args.host,
                                metrics_port=args.metrics_port)
        stack.wait_serving([gateway], health, lambda: bool(stop_requested))
        _print_banner(args, stack, gateway, visions, llm, redis_url)
        while not stop_requested:
            for child in stack.children:
                if child.process.poll() is not None:
                    raise StackError(f"{child.name} exited unexpectedly with {child.process.returncode}; its log "
                                     f"({child.log_path}) ends:\n{child.log_tail()}")
            time.sleep(0.5)
        print("\nstopping (gateway first, then the services, then redis)...", flush=True)
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
    finally:
        stack.stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("stopped", flush=True)
    return 0


def _print_banner(args, stack: Stack, gateway: Child, visions: list[Child], llm: Child, redis_url: str) -> None:
    host = "localhost" if args.host in ("127.0.0.1", "0.0.0.0") else args.host
    example = Path(__file__).resolve().parents[2].parent / "shared" / "golden" / "small_120x90.png"
    image = str(example) if example.exists() else "PATH/TO/IMAGE.jpg"
    lines = [
        "",
        f"InternVL gateway (gRPC internvl.gateway.v1.ChatService) on {host}:{args.gateway_port}",
        *([f"OpenAI-compatible API on http://{host}:{args.http_port}/v1"] if args.http_port else []),
        f"metrics: gateway http://{host}:{gateway.metrics_port}/metrics, "
        + ", ".join(f"{c.name} http://127.0.0.1:{c.metrics_port}/metrics" for c in [*visions, llm]),
        f"redis: {redis_url}; logs: {stack.log_dir}",
        "",
        "try:",
        f"  internvl-chat --target {host}:{args.gateway_port}{_client_flags(args)} --image {image} "
        + "--max-tokens 32 'Describe the image.'",
        "",
        "Ctrl-C stops everything.",
    ]
    print("\n".join(lines), flush=True)


def _client_flags(args) -> str:
    """The internvl-chat options this stack needs: its CA with TLS, the token file with a token."""
    flags = f" --tls-ca {args.tls_ca}" if args.tls_cert and args.tls_ca else (" --tls" if args.tls_cert else "")
    return flags + (f" --token-file {args.api_token_file}" if args.api_token_file else "")
