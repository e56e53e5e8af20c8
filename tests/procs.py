"""The tests' defaults for real processes (tools.launcher does the work).

Children run from the repository with it on PYTHONPATH and log into temp files kept for the failure messages. They
are not tied to their parent: the tests start them from worker threads, whose end would otherwise stop them.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from tools.launcher import (
    REPO,
    Child,
    LocalRedisCluster,
    RedisServer,
    cli_env,
    start_redis,
    start_redis_cluster,
    start_service,
    stop_together,
    temp_log,
    wait_serving,
)

__all__ = ["REPO", "Child", "redis_cluster", "redis_server", "run_service", "spawn_service", "stop_together",
           "wait_for", "wait_serving"]


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.02):
    """The first truthy `condition()`, polled every `interval_s`; AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out waiting for {what}")


def spawn_service(name: str, command: str, *args: str, env: Mapping[str, str] | None = None) -> Child:
    """`internvl-serve COMMAND ARGS...` started on ports it chooses itself (not waited for: `wait_serving` also
    waits for the ports it reports)."""
    return start_service(name, command, *args, log_path=temp_log(name), cwd=REPO, env=cli_env(env))


@contextlib.contextmanager
def run_service(command: str, *args: str, timeout_s: float = 120,
                env: Mapping[str, str] | None = None) -> Iterator[Child]:
    """`internvl-serve COMMAND ...` as a subprocess, yielded once SERVING; stopped with SIGTERM (the graceful path),
    killed if it does not exit in 20 s."""
    service = spawn_service(command, command, *args, env=env)
    try:
        wait_serving([service], timeout_s)
        yield service
    finally:
        service.stop()


@contextlib.contextmanager
def redis_server(maxmemory: str = "256mb", policy: str = "allkeys-lru") -> Iterator[RedisServer]:
    """A private redis-server (persistence off) in a throwaway directory, stopped and removed on exit."""
    workdir = Path(tempfile.mkdtemp(prefix="internvl-redis-"))
    try:
        server = start_redis(workdir, maxmemory=maxmemory, policy=policy)
        try:
            yield server
        finally:
            server.stop(grace_s=5)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def redis_cluster(masters: int = 3, replicas_per_master: int = 0, maxmemory: str = "256mb",
                  policy: str = "allkeys-lru", **options) -> Iterator[LocalRedisCluster]:
    """A private Redis Cluster (`start_redis_cluster`: persistence off, a 1 s node timeout) in a throwaway
    directory, stopped and removed on exit; `options` as `start_redis_cluster`'s."""
    workdir = Path(tempfile.mkdtemp(prefix="internvl-redis-cluster-"))
    try:
        cluster = start_redis_cluster(workdir, masters=masters, replicas_per_master=replicas_per_master,
                                      maxmemory=maxmemory, policy=policy, **options)
        try:
            yield cluster
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
