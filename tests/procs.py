"""Starting the project's services as real processes for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServiceProcess:
    process: subprocess.Popen
    port: int
    metrics_port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def metrics_text(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()


def _wait_serving(service: ServiceProcess, health_name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(service.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if service.process.poll() is not None:
                raise RuntimeError(f"service exited with {service.process.returncode}:\n{service.log_tail()}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=health_name), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{health_name} not SERVING after {timeout_s}s:\n{service.log_tail()}")


@contextlib.contextmanager
def run_service(command: str, *args: str, health_name: str, timeout_s: float = 120,
                env: dict[str, str] | None = None) -> Iterator[ServiceProcess]:
    """`internvl-serve COMMAND --port P --metrics-port M ARGS...` as a subprocess, yielded once SERVING.

    Stopped with SIGTERM (the graceful path) and killed if it does not exit in 20 s. Its log is kept for messages.
    """
    port, metrics_port = free_port(), free_port()
    log_file = tempfile.NamedTemporaryFile(prefix=f"{command}-", suffix=".log", delete=False)  # noqa: SIM115 - outlives this frame
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", command, "--port", str(port), "--host", "127.0.0.1",
         "--metrics-port", str(metrics_port), *args],
        cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    service = ServiceProcess(process, port, metrics_port, Path(log_file.name))
    try:
        _wait_serving(service, health_name, timeout_s)
        yield service
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log_file.close()
