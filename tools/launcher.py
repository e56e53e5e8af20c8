"""Child processes of a stack on this machine: the services (`python -m tools.cli COMMAND`) and redis-server (one,
or several making a local Redis Cluster).

One place for what `internvl-serve up`, the benchmark and the tests all do with them: start a child with its output
in a log file, tie it to its parent, learn the ports it bound, wait until it reports SERVING on grpc.health.v1 (the
error ends with its log's tail when it exits or is not ready in time), read its /metrics, restart it on the same
ports, and stop it with SIGTERM, then SIGKILL after a grace period.

Ports are never chosen here for a service: it binds port 0 (or the port it is given) and reports what it got in its
`--port-file` (services.runtime.ports), so no other process can take a port between a choice and the bind. Only
redis-server, which cannot bind port 0 (`--port 0` turns TCP off there), gets a port picked here, and is started again
on another when it exits at start.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import grpc
import redis
import redis.cluster
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from services.contract.errors import InternVLError
from services.contract.service_names import SERVICE_BY_COMMAND
from services.runtime.ports import read_port_file

LOOPBACK = "127.0.0.1"
# The repository root: where `services` and `gateway` are importable from.
REPO = Path(__file__).resolve().parents[1]
# The grpc.health.v1 service name each service command reports: its gRPC service's full name.
LOG_TAIL_CHARS = 4000
REDIS_INSTALL_HINT = "install it with `apt-get install -y redis-server` (make bootstrap does this)"
# How often a redis-server may exit at start, most likely because another process took its port in between.
_REDIS_PORT_ATTEMPTS = 3


class LaunchError(InternVLError):
    """A child did not start: it exited, or was not ready in time; the message ends with its log's tail."""


class RedisMissingError(LaunchError):
    """redis-server is not on PATH."""


def free_port() -> int:
    """A loopback TCP port nobody listens on now. Another process may take it before a child binds it: only for
    redis-server, which is started again on another port when that happens, and for an address nobody answers."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
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


def cli_env(extra: Mapping[str, str] | None = None, drop: Sequence[str] = ()) -> dict[str, str]:
    """This process's environment for a `tools.cli` child: the repository first on PYTHONPATH, `drop` removed,
    `extra` added."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return {**env, **(extra or {})}


def temp_log(name: str) -> Path:
    """A new empty log file in the temp directory, kept after the child ends for the failure messages."""
    fd, path = tempfile.mkstemp(prefix=f"internvl-{name}-", suffix=".log")
    os.close(fd)
    return Path(path)


def read_metrics(port: int, timeout_s: float = 10.0) -> str:
    """The Prometheus text a process serves on http://127.0.0.1:PORT/metrics."""
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=timeout_s) as response:
        return response.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The samples `name` of Prometheus text exposition that carry these labels, summed over their other labels (0
    when there is none): `metric(text, "internvl_llm_generated_tokens_total")` counts every model's tokens."""
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    argv: list[str]


def processes() -> list[ProcessInfo]:
    """Every process of this machine that can be read now (from /proc), to find children started by another."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after the last ')'.
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except (OSError, IndexError, ValueError):
                continue
            found.append(ProcessInfo(int(entry.name), ppid, argv))
    return found


# ------------------------------------------------------------------------------------------------------ children


@dataclass
class Child:
    """A started process, with what it takes to start it again the same way (same argv, so the same ports)."""

    name: str
    argv: list[str]
    process: subprocess.Popen
    # None: its output is a text pipe (`process.stdout`) the caller reads.
    log_path: Path | None
    command: str | None = None  # the tools.cli subcommand, for its health service name
    port: int | None = None
    metrics_port: int | None = None
    cwd: Path | None = None
    env: Mapping[str, str] | None = None
    own_session: bool = False
    tie_to_parent: bool = False
    # A service's `--port-file`: its ports (None above) are known once it has written it (see `reported`).
    port_file: Path | None = None
    http_port: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def address(self) -> str:
        if self.port is None:
            raise LaunchError(f"{self.name} has not reported its port yet (wait_serving waits for it)")
        return f"{LOOPBACK}:{self.port}"

    def reported(self) -> bool:
        """Whether its ports are known: read from its port file once it has written it. From then on its `argv`
        names them, so that a restart binds the same ports."""
        if self.port is None and self.port_file is not None:
            ports = read_port_file(self.port_file)
            if ports is not None:
                self.port, self.metrics_port, self.http_port = (ports["port"], ports.get("metrics_port"),
                                                                ports.get("http_port"))
                self.argv = _naming_ports(self.argv, ports)
        return self.port is not None

    def running(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        return self.log_text()[-chars:]

    def exit_report(self, when: str) -> str:
        """'NAME exited with CODE WHEN; its log (PATH) ends: ...', for the error a caller raises. When the CLI
        refused to go on (exit code 2), the one line it wrote instead: 'NAME exited with 2 WHEN: internvl-serve
        COMMAND: error: ... (its log: PATH)'."""
        code = self.process.returncode
        refusal = [line for line in self.log_tail().splitlines()
                   if line.startswith("internvl-serve ") and ": error: " in line] if code == 2 else []
        if refusal:
            return f"{self.name} exited with 2 {when}: {refusal[-1]} (its log: {self.log_path})"
        return f"{self.name} exited with {code} {when}; its log ({self.log_path}) ends:\n{self.log_tail()}"

    def metrics(self) -> str:
        return read_metrics(self.metrics_port)

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.metrics(), name, **labels)

    def rss_bytes(self) -> int:
        """Resident memory of the process now (VmRSS)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for {self.name}")

    def kill(self) -> None:
        """SIGKILL: no drain, no cleanup (a crash, as the fault tests want it)."""
        if self.running():
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self, grace_s: float = 20.0, sig: int = signal.SIGTERM) -> None:
        """`sig` (SIGTERM: the graceful path), then SIGKILL if it has not exited after `grace_s`."""
        stop_together([self], grace_s, sig)

    def restart(self) -> Self:
        """The same command started again (same ports, log appended), as Kubernetes restarts a pod behind its
        Service; the old process must have exited."""
        self.process = _popen(self.argv, self.log_path, self.cwd, self.env, self.own_session, self.tie_to_parent,
                              append=True)
        return self


# The flag of each port a port file reports.
_PORT_FLAGS = {"port": "--port", "metrics_port": "--metrics-port", "http_port": "--http-port"}


def _naming_ports(argv: list[str], ports: Mapping[str, int]) -> list[str]:
    """`argv` with the value of each port flag replaced by the port reported (the last occurrence: argparse's)."""
    out = list(argv)
    for name, flag in _PORT_FLAGS.items():
        if name in ports and flag in out:
            out[len(out) - out[::-1].index(flag)] = str(ports[name])
    return out


def reported_ports(argv: Sequence[str]) -> dict[str, int] | None:
    """The ports reported by the service started with `argv` (found by its `--port-file`), None while it has not
    (or for a process without one)."""
    return read_port_file(argv[argv.index("--port-file") + 1]) if "--port-file" in argv else None


def stop_together(children: Sequence[Child], grace_s: float = 20.0, sig: int = signal.SIGTERM) -> None:
    """`sig` to all at once, so that they drain side by side; SIGKILL to those still running after `grace_s`."""
    running = [c for c in children if c.running()]
    for child in running:
        child.process.send_signal(sig)
    deadline = time.monotonic() + grace_s
    for child in running:
        try:
            child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()


def _popen(argv: list[str], log_path: Path | None, cwd: Path | None, env: Mapping[str, str] | None,
           own_session: bool, tie_to_parent: bool, append: bool = False) -> subprocess.Popen:
    with contextlib.ExitStack() as files:
        # The child keeps its own handle on the log; this process's is closed when the child has started.
        log = files.enter_context(open(log_path, "ab" if append else "wb")) if log_path else subprocess.PIPE
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                text=log_path is None, cwd=cwd, env=env, start_new_session=own_session,
                                # Safe with threads: die_with_parent only calls into libc, loaded before the fork.
                                preexec_fn=die_with_parent if tie_to_parent else None)  # noqa: PLW1509


# The last line of `internvl-serve up`'s banner, printed once every service reports SERVING.
UP_READY_LINE = "Ctrl-C stops everything."


def read_banner(process: subprocess.Popen, last_line: str = UP_READY_LINE) -> str:
    """What `process` (started with a text stdout pipe) printed, up to the line holding `last_line`, or up to its
    exit if it never printed it."""
    banner = []
    for line in process.stdout:
        banner.append(line)
        if last_line in line:
            break
    return "".join(banner)


def spawn(name: str, argv: list[str], log_path: Path | None, *, command: str | None = None,
          port: int | None = None, metrics_port: int | None = None, cwd: Path | None = None,
          env: Mapping[str, str] | None = None, own_session: bool = False, tie_to_parent: bool = False,
          port_file: Path | None = None, kind: type[Child] = Child) -> Child:
    """Start `argv` with stdout and stderr in `log_path` (truncated; None: a text pipe); a `kind` for it.

    `own_session`: its own process group, so a terminal's Ctrl-C reaches only the parent, which orders the
    shutdown. `tie_to_parent`: SIGTERM when the spawning thread dies (see `die_with_parent`).
    """
    process = _popen(argv, log_path, cwd, env, own_session, tie_to_parent)
    return kind(name, argv, process, log_path, command, port, metrics_port, cwd, env, own_session, tie_to_parent,
                port_file)


def service_argv(command: str, *args: str, port_file: Path, port: int = 0, metrics_port: int = 0,
                 host: str = LOOPBACK, cli_flags: Sequence[str] = ()) -> list[str]:
    """`python -m tools.cli [CLI_FLAGS] COMMAND --port P --host H --metrics-port M --port-file F ARGS...`."""
    return [sys.executable, "-m", "tools.cli", *cli_flags, command, "--port", str(port), "--host", host,
            "--metrics-port", str(metrics_port), "--port-file", str(port_file), *args]


def start_service(name: str, command: str, *args: str, log_path: Path, port: int = 0, metrics_port: int = 0,
                  host: str = LOOPBACK, cli_flags: Sequence[str] = (), **options) -> Child:
    """`python -m tools.cli [CLI_FLAGS] COMMAND --port P --host H --metrics-port M ARGS...`, its ports reported in a
    file beside `log_path` (0, the default: any free port); `cli_flags` are the CLI's global flags (logging),
    `options` as `spawn`'s. Not waited for: see `wait_serving`, which also waits for the ports."""
    port_file = log_path.with_name(f"{log_path.stem}.ports.json")
    port_file.unlink(missing_ok=True)  # a previous run's, which would report the wrong ports
    argv = service_argv(command, *args, port_file=port_file, port=port, metrics_port=metrics_port, host=host,
                        cli_flags=cli_flags)
    return spawn(name, argv, log_path, command=command, port_file=port_file, **options)


def wait_serving(children: Sequence[Child], timeout_s: float = 120.0, *,
                 credentials: grpc.ChannelCredentials | None = None, stopping: Callable[[], bool] = lambda: False,
                 on_ready: Callable[[Child], None] = lambda child: None) -> bool:
    """Until every child has reported its ports and reports SERVING for its command's service on grpc.health.v1
    (over TLS with `credentials`), calling `on_ready` for each as it does. False if `stopping()` turned true first;
    LaunchError, with the log's tail, if one exits or they are not all ready after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    waiting = list(children)
    channels: dict[int, grpc.Channel] = {}
    try:
        while waiting:
            if stopping():
                return False
            for child in list(waiting):
                if not child.running():
                    raise LaunchError(child.exit_report("while starting"))
                if not child.reported():
                    continue
                if id(child) not in channels:
                    channels[id(child)] = grpc.secure_channel(child.address, credentials) \
                        if credentials is not None else grpc.insecure_channel(child.address)
                stub = health_pb2_grpc.HealthStub(channels[id(child)])
                with contextlib.suppress(grpc.RpcError):
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_BY_COMMAND[child.command]),
                                       timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        waiting.remove(child)
                        on_ready(child)
            if waiting and time.monotonic() > deadline:
                tails = "\n".join(f"--- {c.name} ({c.log_path}):\n{c.log_tail()}" for c in waiting)
                raise LaunchError(f"{', '.join(c.name for c in waiting)} not SERVING after {timeout_s:.0f}s; "
                                  f"the logs end:\n{tails}")
            if waiting:
                time.sleep(0.1)
    finally:
        for channel in channels.values():
            channel.close()
    return True


# ---------------------------------------------------------------------------------------------------------- redis


@dataclass
class RedisServer(Child):
    """A redis-server child: persistence off, a memory cap and an eviction policy, on one loopback port."""

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host=LOOPBACK, port=self.port, socket_connect_timeout=1, socket_timeout=5)

    def scan_keys(self, match: str) -> list[bytes]:
        """Every key matching the glob `match` now."""
        with contextlib.closing(self.client()) as client:
            return list(client.scan_iter(match=match, count=1000))

    def wait_ready(self, timeout_s: float = 10.0) -> bool:
        """Until it answers on its port: True; False if it exited first (its port was taken). LaunchError if it does
        not answer in time."""
        client = redis.Redis(host=LOOPBACK, port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if not self.running():
                    return False
                with contextlib.suppress(redis.exceptions.RedisError):
                    # This server, not another that held the port while this one failed to bind it.
                    if client.info("server").get("process_id") == self.pid:
                        return True
                time.sleep(0.02)
        finally:
            client.close()
        self.kill()
        raise LaunchError(f"redis-server on port {self.port} did not answer in {timeout_s:.0f}s; its log "
                          f"({self.log_path}) ends:\n{self.log_tail()}")

    def restart(self, timeout_s: float = 10.0) -> Self:
        """Started again on the same port, empty (nothing is persisted), once it answers PING."""
        super().restart()
        if not self.wait_ready(timeout_s):
            raise LaunchError(self.exit_report("at restart"))
        return self


def start_redis(workdir: Path, *, maxmemory: str = "256mb", policy: str = "allkeys-lru", port: int | None = None,
                timeout_s: float = 10.0, log_path: Path | None = None, **options) -> RedisServer:
    """redis-server in `workdir` on a free port (or `port`), once it answers PING; `options` as `spawn`'s.

    Evicting under `maxmemory` with `policy` (production's `allkeys-lru`: embeddings are a cache). Without a fixed
    port, a server that exits at start is tried again on another one.
    """
    return _start_redis_server(workdir, "redis", lambda chosen: [], maxmemory=maxmemory, policy=policy, port=port,
                               timeout_s=timeout_s, log_path=log_path, **options)


def _start_redis_server(workdir: Path, name: str, extra: Callable[[int], Sequence[str]], *, maxmemory: str,
                        policy: str, port: int | None, timeout_s: float, log_path: Path | None,
                        **options) -> RedisServer:
    """One redis-server, persistence off, with `extra(port)` arguments appended."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisMissingError(f"redis-server is not on PATH; {REDIS_INSTALL_HINT}")
    attempts = 1 if port else _REDIS_PORT_ATTEMPTS
    for _ in range(attempts):
        chosen = port or free_port()
        argv = [binary, "--port", str(chosen), "--bind", LOOPBACK, "--dir", str(workdir), "--daemonize", "no",
                "--save", "", "--appendonly", "no", "--maxmemory", maxmemory, "--maxmemory-policy", policy,
                *extra(chosen)]
        server = spawn(name, argv, log_path or workdir / f"redis-{chosen}.log", port=chosen, kind=RedisServer,
                       **options)
        if server.wait_ready(timeout_s):
            return server
    raise LaunchError(server.exit_report(f"at start ({attempts} attempts)"))


# -------------------------------------------------------------------------------------------------- redis cluster


REDIS_CLI_INSTALL_HINT = "install it with `apt-get install -y redis-tools` (make bootstrap does this)"
# What `redis-cli --cluster create` accepts.
MIN_CLUSTER_MASTERS = 3
HASH_SLOTS = 16384


@dataclass
class LocalRedisCluster:
    """A Redis Cluster of redis-server children on loopback ports (see `start_redis_cluster`); its nodes are
    RedisServers, so each can be killed and restarted (a restarted node rejoins with its old identity)."""

    nodes: list[RedisServer]
    workdir: Path

    @property
    def url(self) -> str:
        """The `redis+cluster://` URL every service takes: all nodes as startup nodes."""
        return "redis+cluster://" + ",".join(node.address for node in self.nodes)

    def client(self) -> redis.cluster.RedisCluster:
        """A synchronous cluster client (for tests and tools)."""
        return redis.cluster.RedisCluster(startup_nodes=[redis.cluster.ClusterNode(LOOPBACK, n.port)
                                                         for n in self.nodes if n.running()],
                                          socket_connect_timeout=1, socket_timeout=5)

    def role(self, node: RedisServer) -> list:
        """ROLE of a running node: ["master", offset, [[host, port, offset], ...]] or ["slave", host, port, state,
        offset]; [] when it does not answer."""
        if not node.running():
            return []
        with contextlib.closing(node.client()) as client:
            try:
                return [x.decode() if isinstance(x, bytes) else x for x in client.execute_command("ROLE")]
            except redis.exceptions.RedisError:
                return []

    def masters(self) -> list[RedisServer]:
        """The running nodes that are masters now."""
        return [node for node in self.nodes if self.role(node)[:1] == ["master"]]

    def replicas_of(self, master: RedisServer) -> list[RedisServer]:
        """The nodes replicating `master` now."""
        role = self.role(master)
        ports = {int(entry[1]) for entry in role[2]} if role[:1] == ["master"] else set()
        return [node for node in self.nodes if node.port in ports]

    def info(self, node: RedisServer) -> dict[str, str]:
        """CLUSTER INFO of a running node, as a dict of strings."""
        with contextlib.closing(node.client()) as client:
            parsed = client.execute_command("CLUSTER INFO")  # redis-py parses it into a dict
        return {str(k): v.decode() if isinstance(v, bytes) else str(v) for k, v in parsed.items()}

    def healthy(self) -> bool:
        """Every running node says `cluster_state:ok` with every slot served, and every running replica is in sync
        with its master (so that it can take over)."""
        running = [node for node in self.nodes if node.running()]
        try:
            infos = [self.info(node) for node in running]
        except redis.exceptions.RedisError:
            return False
        if any(i.get("cluster_state") != "ok" or i.get("cluster_slots_ok") != str(HASH_SLOTS) for i in infos):
            return False
        return all(role[3] == "connected" for role in map(self.role, running) if role[:1] == ["slave"])

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        """Until `healthy()`; LaunchError with the nodes' log tails if not in time."""
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {n.name} ({n.log_path}):\n{n.log_tail(1000)}" for n in self.nodes)
                raise LaunchError(f"Redis Cluster not healthy after {timeout_s:.0f}s; the logs end:\n{tails}")
            time.sleep(0.05)

    def kill(self, node: RedisServer) -> None:
        """SIGKILL one node (a crash: its replica, if any, takes over after the node timeout)."""
        node.kill()

    def scan_keys(self, match: str) -> list[bytes]:
        """Every key matching the glob `match` now, from every master (each holds its own slots)."""
        return [key for master in self.masters() for key in master.scan_keys(match)]

    def running(self) -> bool:
        return all(node.running() for node in self.nodes)

    def stop(self, grace_s: float = 5.0) -> None:
        stop_together(self.nodes, grace_s)


def start_redis_cluster(workdir: Path, *, masters: int = MIN_CLUSTER_MASTERS, replicas_per_master: int = 0,
                        maxmemory: str = "256mb", policy: str = "allkeys-lru", node_timeout_ms: int = 1000,
                        full_coverage: bool = False, timeout_s: float = 30.0, **options) -> LocalRedisCluster:
    """A Redis Cluster of `masters` masters with `replicas_per_master` replicas each, every node a redis-server
    child as `start_redis` makes them (persistence off, `maxmemory` and `policy`), in a new directory under
    `workdir` (node configuration files and logs); returned once every node says `cluster_state:ok`.

    `node_timeout_ms`: how long a silent master takes to be declared failed (then its replica is promoted, about a
    second later); small, for tests. `full_coverage=False` (`cluster-require-full-coverage no`): while a master is
    down only its own slots fail, the other masters keep serving theirs. Replicas take over whatever their
    replication lag (`cluster-replica-validity-factor 0`): the data is a cache, and a lost key is a miss.
    `options` as `spawn`'s.
    """
    if masters < MIN_CLUSTER_MASTERS:
        raise ValueError(f"a Redis Cluster needs at least {MIN_CLUSTER_MASTERS} masters, not {masters}")
    if replicas_per_master < 0:
        raise ValueError(f"replicas_per_master must be >= 0, not {replicas_per_master}")
    cli = shutil.which("redis-cli")
    if cli is None:
        raise RedisMissingError(f"redis-cli is not on PATH; {REDIS_CLI_INSTALL_HINT}")
    # A fresh directory: a node finding an old nodes-PORT.conf would think it is in another cluster already.
    directory = Path(tempfile.mkdtemp(prefix="redis-cluster-", dir=workdir))

    def extra(port: int) -> list[str]:
        return ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                # The bus port is chosen too: by default it is port + 10000, which may be taken or beyond 65535.
                "--cluster-port", str(free_port()),
                "--cluster-node-timeout", str(node_timeout_ms),
                "--cluster-require-full-coverage", "yes" if full_coverage else "no",
                "--cluster-replica-validity-factor", "0",
                # A replica syncs at once (the default waits 5 s for more replicas to share one transfer).
                "--repl-diskless-sync-delay", "0"]

    cluster = LocalRedisCluster([], directory)
    try:
        for index in range(masters * (1 + replicas_per_master)):
            cluster.nodes.append(_start_redis_server(directory, f"redis-{index}", extra, maxmemory=maxmemory,
                                                     policy=policy, port=None, timeout_s=timeout_s, log_path=None,
                                                     **options))
        # The first `masters` addresses become the masters, the rest their replicas.
        create = subprocess.run([cli, "--cluster", "create", *(n.address for n in cluster.nodes),
                                 "--cluster-replicas", str(replicas_per_master), "--cluster-yes"],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s,
                                check=False)
        (directory / "cluster-create.log").write_text(create.stdout + create.stderr)
        if create.returncode != 0:
            raise LaunchError(f"redis-cli --cluster create failed ({create.returncode}):\n"
                              f"{(create.stdout + create.stderr)[-LOG_TAIL_CHARS:]}")
        cluster.wait_healthy(timeout_s)
    except BaseException:
        cluster.stop()
        raise
    return cluster
