"""`internvl-serve up`: the whole stack on this machine, as separate processes, until Ctrl-C.

Starts Redis (a private `redis-server` child, or with `--redis-cluster M` a local Redis Cluster of M masters, unless
`--redis-url` is given), the vision service (`--vision-replicas` of them), the LLM service (`--llm-replicas` of them)
and the gateway, each as its own process (the services' own flags, set on `up`, passed on: `tools.up_flags`),
waits until each reports SERVING on
grpc.health.v1, prints the addresses and an example `internvl-chat` call, and serves until SIGINT/SIGTERM. Then it
stops them in reverse order (the gateway drains its streams before the services behind it stop), each with SIGTERM
and a grace period. Children run in their own process group, so Ctrl-C reaches only this supervisor, which orders the
shutdown; they also get SIGTERM if the supervisor dies.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time
from pathlib import Path

from services.contract.errors import InternVLError
from tools.launcher import (
    MIN_CLUSTER_MASTERS,
    REPO,
    UP_READY_LINE,
    Child,
    RedisMissingError,
    cli_env,
    start_redis,
    start_redis_cluster,
    start_service,
    wait_serving,
)
from tools.up_flags import add_forwarded_flags, check_forwarded, forwarded_argv

# Each service drains for up to 30 s (its --drain-seconds) after SIGTERM; then it is killed.
STOP_GRACE_S = 45.0
# Ctrl-C reaches only this supervisor, which orders the shutdown; the children get SIGTERM if it dies (it is
# single-threaded when it spawns, so the spawning thread lives as long as the children should).
SUPERVISED = {"own_session": True, "tie_to_parent": True}
# The model services here share this machine's cores, each with an OpenMP team as wide as the machine. libgomp's
# default spin-wait (300,000 rounds) then burns the cores another process is computing on: on 2 cores, 8 concurrent
# image requests ran at 11.5 tok/s with it and 16.4-16.7 tok/s with 2,000 rounds (single-stream decode step 80 ms
# and 87 ms; passive waiting: 17 tok/s, 95 ms). A deployment that gives each service its own cores needs none of
# this; a value the user set is kept.
COLOCATED_OPENMP = {"GOMP_SPINCOUNT": "2000"}


# `--http-port any`: the gateway binds any free port (its --http-port 0; up's own 0 means no HTTP API).
ANY_PORT = "any"


def port_or_any(text: str) -> int | str:
    return ANY_PORT if text == ANY_PORT else int(text)


class StackError(InternVLError):
    """A part of the stack failed to start; the message names it and shows its log's tail."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`up`'s own flags, then the services' flags it passes on, generated from their configs (`forwarded_flags`)."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the gateway binds (default 127.0.0.1; the services behind it always "
                             "bind 127.0.0.1)")
    parser.add_argument("--gateway-port", type=int, default=50051,
                        help="gateway gRPC port (default 50051; 0: any free port, printed at start)")
    parser.add_argument("--http-port", type=port_or_any, default=8000,
                        help=f"OpenAI-compatible HTTP port (default 8000; 0: none; {ANY_PORT}: any free port, "
                             "printed at start)")
    parser.add_argument("--metrics-port", type=int, default=9100,
                        help="gateway /metrics port (default 9100; 0: any free port); the services get free ports, "
                             "printed at start")
    redis = parser.add_mutually_exclusive_group()
    redis.add_argument("--redis-url", default=None,
                       help="use this Redis (redis://...) or Redis Cluster (redis+cluster://host:port,...) instead "
                            "of starting redis-server")
    redis.add_argument("--redis-cluster", type=int, default=0, metavar="M",
                       help="start a local Redis Cluster of M masters (at least 3) instead of one redis-server")
    parser.add_argument("--redis-cluster-replicas", type=int, default=0, metavar="R",
                        help="with --redis-cluster: replicas per master, which take over when it dies (default 0)")
    parser.add_argument("--vision-replicas", type=int, default=1,
                        help="vision processes; the gateway round-robins over them (default 1)")
    parser.add_argument("--llm-replicas", type=int, default=1,
                        help="LLM processes, each on its own port; the gateway routes over them (default 1)")
    parser.add_argument("--log-dir", default=None, help="where the processes' logs go (default: a temp directory)")
    parser.add_argument("--otlp-endpoint", default=None,
                        help="every process sends OpenTelemetry traces to this OTLP/gRPC collector (e.g. "
                             "http://127.0.0.1:4317); default: off unless the OTEL_* environment names an exporter")
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
    add_forwarded_flags(parser)


class Stack:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.children: list[Child] = []
        self.log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="internvl-up-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def service(self, name: str, command: str, *extra: str, host: str = "127.0.0.1", port: int = 0,
                metrics_port: int = 0) -> Child:
        """A service started (not waited for) on `port` and `metrics_port` (0: any free port; the ports it bound are
        known once `wait_serving` is done)."""
        openmp = {} if command == "gateway" or {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(os.environ) \
            else COLOCATED_OPENMP
        otlp = ["--otlp-endpoint", self.args.otlp_endpoint] if getattr(self.args, "otlp_endpoint", None) else []
        child = start_service(name, command, *extra, *otlp, log_path=self.log_dir / f"{name}.log", port=port,
                              metrics_port=metrics_port, host=host, cli_flags=self.log_flags(), env=cli_env(openmp),
                              **SUPERVISED)
        self.children.append(child)
        return child

    def log_flags(self) -> list[str]:
        """`up`'s own --log-level and --log-format, for its children. A Namespace built by `up`'s parser alone,
        without the CLI's global flags, has neither; the children then get the CLI's defaults."""
        a = self.args
        level, log_format = getattr(a, "log_level", None), getattr(a, "log_format", None)
        return [*(["--log-level", level] if level else []), *(["--log-format", log_format] if log_format else [])]

    def start_redis(self) -> str:
        """One redis-server, or a Redis Cluster with --redis-cluster; its URL."""
        a = self.args
        try:
            # Embeddings are a cache: evict the least recently used under pressure.
            if a.redis_cluster:
                cluster = start_redis_cluster(self.log_dir, masters=a.redis_cluster,
                                              replicas_per_master=a.redis_cluster_replicas, maxmemory="1gb",
                                              policy="allkeys-lru", timeout_s=30, **SUPERVISED)
                self.children.extend(cluster.nodes)
                return cluster.url
            child = start_redis(self.log_dir, maxmemory="1gb", policy="allkeys-lru", timeout_s=15,
                                log_path=self.log_dir / "redis.log", **SUPERVISED)
        except RedisMissingError as exc:
            raise StackError(f"{exc}, or pass --redis-url") from None
        self.children.append(child)
        return child.url

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

    def credentials(self):
        """The health checks' channel credentials: None without TLS, else the CA and, with mTLS, the certificate."""
        from services.runtime.tls import ClientTls

        a = self.args
        if not a.tls_cert:
            return None
        tls = ClientTls.from_files(a.tls_ca, a.tls_cert if a.tls_client_ca else None,
                                   a.tls_key if a.tls_client_ca else None)
        return (tls or ClientTls()).credentials()

    def wait_serving(self, children: list[Child], stopping) -> None:
        """Until the children report SERVING, printing each; KeyboardInterrupt if a stop is requested first."""
        def ready(child: Child) -> None:
            print(f"  {child.name} ready on 127.0.0.1:{child.port}", flush=True)

        if not wait_serving(children, self.args.startup_timeout, credentials=self.credentials(), stopping=stopping,
                            on_ready=ready):
            raise KeyboardInterrupt

    def stop_all(self) -> None:
        """Reverse start order: the gateway drains first, Redis goes last."""
        for child in reversed(self.children):
            child.stop(STOP_GRACE_S)


def run(args: argparse.Namespace) -> int:
    if args.vision_replicas < 1:
        raise StackError("--vision-replicas must be >= 1")
    if args.llm_replicas < 1:
        raise StackError("--llm-replicas must be >= 1")
    if args.redis_cluster and args.redis_cluster < MIN_CLUSTER_MASTERS:
        raise StackError(f"--redis-cluster needs at least {MIN_CLUSTER_MASTERS} masters")
    if args.redis_cluster_replicas and not args.redis_cluster:
        raise StackError("--redis-cluster-replicas goes with --redis-cluster")
    if args.redis_cluster_replicas < 0:
        raise StackError("--redis-cluster-replicas must be >= 0")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise StackError("--tls-cert and --tls-key go together")
    if (args.tls_ca or args.tls_client_ca) and not args.tls_cert:
        raise StackError("--tls-ca and --tls-client-ca need --tls-cert and --tls-key")
    check_forwarded(args)
    stop_requested = []

    def on_signal(signum, frame):
        stop_requested.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    stack = Stack(args)
    print(f"starting InternVL stack for {args.model} (logs in {stack.log_dir})", flush=True)
    try:
        redis_url = args.redis_url or stack.start_redis()
        internal = ["--redis-url", redis_url, *stack.tls_server_args(mutual=True)]
        vision_args, llm_args = [*forwarded_argv(args, "vision"), *internal], [*forwarded_argv(args, "llm"), *internal]
        visions = [stack.service(f"vision-{i}", "vision", *vision_args) for i in range(args.vision_replicas)]
        llms = [stack.service("llm" if args.llm_replicas == 1 else f"llm-{i}", "llm", *llm_args)
                for i in range(args.llm_replicas)]
        stack.wait_serving([*visions, *llms], lambda: bool(stop_requested))
        vision_target = "ipv4:" + ",".join(f"127.0.0.1:{v.port}" for v in visions)
        llm_target = "ipv4:" + ",".join(f"127.0.0.1:{llm.port}" for llm in llms)
        gateway_args = ["--vision-target", vision_target, "--llm-target", llm_target, "--redis-url", redis_url,
                        *forwarded_argv(args, "gateway")]
        if args.http_port:
            gateway_args += ["--http-port", "0" if args.http_port == ANY_PORT else str(args.http_port)]
        gateway_args += [*stack.tls_server_args(mutual=False), *stack.tls_upstream_args()]
        gateway = stack.service("gateway", "gateway", *gateway_args, host=args.host, port=args.gateway_port,
                                metrics_port=args.metrics_port)
        stack.wait_serving([gateway], lambda: bool(stop_requested))
        _print_banner(args, stack, gateway, visions, llms, redis_url)
        while not stop_requested:
            for child in stack.children:
                if not child.running():
                    raise StackError(child.exit_report("unexpectedly"))
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


def _print_banner(args, stack: Stack, gateway: Child, visions: list[Child], llms: list[Child],
                  redis_url: str) -> None:
    host = "localhost" if args.host in ("127.0.0.1", "0.0.0.0") else args.host
    # The picture `make demo` writes, when it is there.
    example = REPO / "checkpoints" / "demo-640x480.png"
    image = str(example) if example.exists() else "PATH/TO/IMAGE.jpg"
    lines = [
        "",
        f"InternVL gateway (gRPC internvl.gateway.v1.ChatService) on {host}:{gateway.port}",
        *([f"OpenAI-compatible API on http://{host}:{gateway.http_port}/v1"] if gateway.http_port else []),
        f"metrics: gateway http://{host}:{gateway.metrics_port}/metrics, "
        + ", ".join(f"{c.name} http://127.0.0.1:{c.metrics_port}/metrics" for c in [*visions, *llms]),
        "services: " + ", ".join(f"{c.name} 127.0.0.1:{c.port}" for c in [*visions, *llms]),
        f"redis: {redis_url}; logs: {stack.log_dir}",
        "",
        "try:",
        f"  internvl-chat --target {host}:{gateway.port}{_client_flags(args)} --image {image} "
        + "--max-tokens 32 'Describe the image.'",
        "",
        UP_READY_LINE,
    ]
    print("\n".join(lines), flush=True)


def _client_flags(args) -> str:
    """The internvl-chat options this stack needs: its CA with TLS, the token file with a token."""
    flags = f" --tls-ca {args.tls_ca}" if args.tls_cert and args.tls_ca else (" --tls" if args.tls_cert else "")
    return flags + (f" --token-file {args.api_token_file}" if args.api_token_file else "")
