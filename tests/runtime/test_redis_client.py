"""The Redis client layer without a Redis: the URL forms `connect` takes, the cluster client's retries, and what each
Redis failure becomes for a caller (`redis_errors`)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis.exceptions
import torch
from redis.asyncio import Redis
from redis.backoff import NoBackoff

from services.contract.errors import NotReadyError, OverloadedError
from services.runtime.embedding_store import EmbeddingCache
from services.runtime.redis_client import (
    CLUSTER_RETRY_BUDGET_S,
    MAX_CONNECTIONS,
    REPLY_TIMEOUT_S,
    connect,
    redis_errors,
)
from services.runtime.redis_cluster import (
    ClusterUnreachableError,
    ResilientRedisCluster,
    connect_cluster,
    is_cluster_url,
    parse_cluster_url,
    retry_transient,
)
from tools.launcher import free_port

# ------------------------------------------------------------------------------------------------------- URLs


def test_cluster_url_names_startup_nodes():
    parsed = parse_cluster_url("redis+cluster://10.0.0.1:7000,redis-1:7001,redis-2")
    assert parsed.nodes == (("10.0.0.1", 7000), ("redis-1", 7001), ("redis-2", 6379))
    assert not parsed.tls and parsed.options == {}


def test_cluster_url_credentials_tls_ipv6_and_options():
    parsed = parse_cluster_url("rediss+cluster://app:s%40cret@[::1]:7000,h:7001/0?socket_timeout=2.5"
                               "&ssl_ca_certs=/ca.pem")
    assert parsed.nodes == (("::1", 7000), ("h", 7001))
    assert parsed.tls
    assert parsed.options == {"username": "app", "password": "s@cret", "socket_timeout": 2.5,
                              "ssl_ca_certs": "/ca.pem"}


@pytest.mark.parametrize("url", ["redis+cluster://h:notaport", "redis+cluster://h:0", "redis+cluster://h:1,",
                                 "redis+cluster://h:7000/3", "redis://h:7000"])
def test_bad_cluster_urls_are_refused(url):
    with pytest.raises(ValueError):
        parse_cluster_url(url)


def test_refusals_never_show_the_password():
    with pytest.raises(ValueError) as info:
        parse_cluster_url("redis+cluster://u:hunter2@h:x")
    assert "hunter2" not in str(info.value)


def test_connect_picks_the_client_by_scheme():
    assert is_cluster_url("REDIS+CLUSTER://h:1") and not is_cluster_url("redis://h:1/0")
    single = connect("redis://127.0.0.1:6379/0")
    assert type(single) is Redis
    cluster = connect("redis+cluster://127.0.0.1:7000,127.0.0.1:7001?socket_timeout=7")
    assert isinstance(cluster, ResilientRedisCluster)
    assert sorted(cluster.nodes_manager.startup_nodes) == ["127.0.0.1:7000", "127.0.0.1:7001"]
    # The same connection settings as the single-node client; the URL's query wins.
    kwargs = cluster.connection_kwargs
    assert (kwargs["socket_connect_timeout"], kwargs["socket_timeout"], kwargs["health_check_interval"]) == (5, 7, 15)
    # redis-py retries nothing itself: the retries are ours, with a backoff.
    assert cluster.retry.get_retries() == 0 and cluster._retry_budget_s == CLUSTER_RETRY_BUDGET_S


@pytest.mark.asyncio
async def test_more_concurrent_reads_than_the_pool_has_connections_wait_for_one(redis_url):
    """A request with many images reads its embeddings concurrently: past the pool's connections a command waits
    for a free one (a real redis-server; with redis-py's default pool this failed with "Too many connections")."""
    client = connect(redis_url)
    cache = EmbeddingCache(client, "model-fingerprint")
    keys = [f"test:pool:{uuid.uuid4().hex}:{i}" for i in range(MAX_CONNECTIONS + 50)]
    try:
        for i, key in enumerate(keys):
            await cache.put(key, torch.full((2, 4), float(i)), ttl_s=60)
        values = await asyncio.gather(*(cache.get(key) for key in keys))
        assert [None if v is None else v[0, 0].item() for v in values] == [float(i) for i in range(len(keys))]
        assert client.connection_pool.max_connections == MAX_CONNECTIONS
    finally:
        await client.delete(*keys)
        await client.aclose()


# ---------------------------------------------------------------------------------------------------- retries


@pytest.mark.asyncio
@pytest.mark.parametrize("error", [redis.exceptions.ConnectionError("refused"),
                                   redis.exceptions.ClusterDownError("CLUSTERDOWN The cluster is down"),
                                   redis.exceptions.MasterDownError("MASTERDOWN Link with MASTER is down"),
                                   redis.exceptions.TryAgainError("TRYAGAIN"),
                                   redis.exceptions.ClusterError("TTL exhausted."),
                                   redis.exceptions.SlotNotCoveredError("slot 7 is not covered"),
                                   ClusterUnreachableError("no node answered")],
                         ids=lambda e: type(e).__name__)
async def test_transient_cluster_errors_are_retried(error):
    calls = 0

    async def attempt():
        nonlocal calls
        calls += 1
        if calls < 4:
            raise error
        return "done"

    assert await retry_transient(attempt, budget_s=2, backoff=NoBackoff()) == "done" and calls == 4


def _raising_in(filename: str, function: str, exc: BaseException):
    """A function named `function` whose code lives in `filename` (as traceback frames show it), raising `exc`."""
    namespace: dict = {}
    exec(compile(f"def {function}(exc):\n    raise exc\n", filename, "exec"), namespace)  # noqa: S102
    return lambda: namespace[function](exc)


@pytest.mark.asyncio
async def test_a_write_on_a_connection_closed_meanwhile_is_retried_as_a_connection_error():
    """redis-py 8.1 lets a write race with a closing connection escape as AttributeError / TypeError; raised in its
    connection's write, that is retried like the ConnectionError it stands for. The same errors anywhere else are
    bugs and are not retried."""
    writer = "/venv/site-packages/redis/asyncio/connection.py"
    raced = [_raising_in(writer, "send_packed_command", AttributeError("'NoneType' object has no attribute "
                                                                        "'writelines'")),
             _raising_in(writer, "send_packed_command", TypeError("'NoneType' object is not callable"))]

    async def attempt():
        if raced:
            raced.pop(0)()
        return "written"

    assert await retry_transient(attempt, budget_s=2, backoff=NoBackoff()) == "written" and not raced
    elsewhere = _raising_in("/repo/services/runtime/embedding_store.py", "send_packed_command", AttributeError("bug"))
    calls = []

    async def bug():
        calls.append(1)
        elsewhere()

    with pytest.raises(AttributeError, match="bug"):
        await retry_transient(bug, budget_s=2, backoff=NoBackoff())
    assert calls == [1]

    async def always():
        _raising_in(writer, "send_packed_command", AttributeError("x"))()

    with pytest.raises(redis.exceptions.ConnectionError, match="closed during a write"):  # once the budget is spent
        await retry_transient(always, budget_s=0.1, backoff=NoBackoff())


@pytest.mark.asyncio
async def test_retries_stop_after_the_budget_and_other_errors_are_not_retried():
    calls = 0

    async def down():
        nonlocal calls
        calls += 1
        raise redis.exceptions.ClusterDownError("CLUSTERDOWN")

    start = time.monotonic()
    with pytest.raises(redis.exceptions.ClusterDownError):
        await retry_transient(down, budget_s=0.3, backoff=NoBackoff())
    assert 0.3 <= time.monotonic() - start < 1 and calls > 1

    calls = 0

    async def wrong_type():
        nonlocal calls
        calls += 1
        raise redis.exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")

    with pytest.raises(redis.exceptions.ResponseError):
        await retry_transient(wrong_type, budget_s=5, backoff=NoBackoff())
    assert calls == 1


@pytest.mark.asyncio
async def test_an_unreachable_cluster_is_not_ready_after_the_retries():
    url = f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    client = connect(url)
    start = time.monotonic()
    try:
        with pytest.raises(NotReadyError), redis_errors("embedding cache"):
            await EmbeddingCache(client, "fp").exists(["a", "b"])  # a pipeline
    finally:
        await client.aclose()
    assert CLUSTER_RETRY_BUDGET_S <= time.monotonic() - start < CLUSTER_RETRY_BUDGET_S + 2
    # A single command, with a shorter budget.
    client = connect_cluster(url, retry_budget_s=0.3, backoff=NoBackoff())
    start = time.monotonic()
    try:
        with pytest.raises(NotReadyError), redis_errors("embedding cache"):
            await EmbeddingCache(client, "fp").get("a")
    finally:
        await client.aclose()
    assert 0.3 <= time.monotonic() - start < 2


@pytest.mark.asyncio
async def test_a_redis_that_accepts_and_never_replies_fails_within_the_reply_timeout():
    """A gray failure: the TCP connection opens (a paused redis-server's kernel still accepts), nothing ever comes
    back. The command fails once, after REPLY_TIMEOUT_S, as UNAVAILABLE naming Redis, instead of hanging or being
    retried for RETRIES x the timeout."""
    connections = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while await reader.read(1 << 16):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = connect(f"redis://127.0.0.1:{port}/0")
    start = time.monotonic()
    try:
        expected = r"embedding cache is unreachable \(Redis did not answer in time\)"
        with pytest.raises(NotReadyError, match=expected), redis_errors("embedding cache"):
            await EmbeddingCache(client, "fp").get("a")
    finally:
        await client.aclose()
        server.close()
        for writer in connections:
            writer.close()
    elapsed = time.monotonic() - start
    assert REPLY_TIMEOUT_S - 0.5 <= elapsed < 2 * REPLY_TIMEOUT_S, elapsed
    assert len(connections) == 1  # one connection, one command: the timeout was not retried


# ------------------------------------------------------------------------------------------------ redis_errors


@pytest.mark.parametrize("error", [redis.exceptions.ConnectionError("refused"), redis.exceptions.TimeoutError(),
                                   redis.exceptions.BusyLoadingError("LOADING"),
                                   redis.exceptions.ReadOnlyError("READONLY"),
                                   redis.exceptions.ClusterDownError("CLUSTERDOWN"),
                                   redis.exceptions.MasterDownError("MASTERDOWN"),
                                   redis.exceptions.TryAgainError("TRYAGAIN"),
                                   redis.exceptions.ClusterError("TTL exhausted."),
                                   redis.exceptions.SlotNotCoveredError("not covered"),
                                   ClusterUnreachableError("no node")],
                         ids=lambda e: type(e).__name__)
def test_unavailable_redis_is_not_ready(error):
    with pytest.raises(NotReadyError, match="the session store is unreachable"), redis_errors("session store"):
        raise error


def test_out_of_memory_is_overloaded_and_other_errors_pass_through():
    with pytest.raises(OverloadedError), redis_errors("embedding cache"):
        raise redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
    with pytest.raises(OverloadedError), redis_errors("embedding cache"):
        raise redis.exceptions.ResponseError("OOM command not allowed")
    with pytest.raises(redis.exceptions.ResponseError), redis_errors("embedding cache"):
        raise redis.exceptions.ResponseError("CROSSSLOT Keys in request don't hash to the same slot")

