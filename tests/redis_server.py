"""A real Redis for tests: the Debian ``redis-server`` binary on a free loopback port.

fakeredis is no substitute for the integration tests (issue 3), so this starts the real server with the
production eviction settings, persistence off, and a throwaway working directory.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis

INSTALL_HINT = "install it with `apt-get install -y redis-server` (make test's bootstrap does this)"
STARTUP_TIMEOUT_S = 10.0
_PORT_ATTEMPTS = 3


class RedisServerError(RuntimeError):
    """redis-server is missing or would not start."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _start_once(binary: str, port: int, workdir: Path, maxmemory: str) -> subprocess.Popen | None:
    """Start redis-server on ``port``; the process once it answers PING, ``None`` if it exited early."""
    log = workdir / f"redis-{port}.log"
    cmd = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(workdir),
        "--daemonize", "no",
        "--save", "",
        "--appendonly", "no",
        "--maxmemory", maxmemory,
        # As in production: under memory pressure evict the least recently used embeddings.
        "--maxmemory-policy", "allkeys-lru",
    ]  # fmt: skip
    # Redis logs to stdout by default; keep it (and any startup error) for the failure message.
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=0.5)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return None  # most likely the port was taken between choosing and binding it
            try:
                if client.ping():
                    return proc
            except redis.exceptions.RedisError:
                time.sleep(0.02)
    finally:
        client.close()
    _stop(proc)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RedisServerError(
        f"redis-server on port {port} did not answer PING in {STARTUP_TIMEOUT_S}s:\n{tail}"
    )


@contextlib.contextmanager
def redis_server(maxmemory: str = "256mb") -> Iterator[str]:
    """Run a private redis-server; yields its URL ``redis://127.0.0.1:PORT/0`` and stops it on exit."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisServerError(f"redis-server is not on PATH; {INSTALL_HINT}")
    with tempfile.TemporaryDirectory(prefix="internvl-redis-") as tmp:
        workdir = Path(tmp)
        for _ in range(_PORT_ATTEMPTS):
            port = _free_port()
            proc = _start_once(binary, port, workdir, maxmemory)
            if proc is not None:
                break
        else:
            log = workdir / f"redis-{port}.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RedisServerError(
                f"redis-server exited at startup {_PORT_ATTEMPTS} times; last log:\n{tail}"
            )
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            _stop(proc)
