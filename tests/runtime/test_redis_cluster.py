"""The shared stores on a real Redis Cluster (redis-server children in cluster mode, made by `start_redis_cluster`):
the embedding cache across slots and masters, single-flight, MOVED and ASK redirections during a slot migration, the
session store and its lock; and a master killed under load, whose replica takes over while every call succeeds or
fails UNAVAILABLE only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import pytest
import pytest_asyncio
import torch
from procs import redis_cluster
from redis.crc import key_slot

from gateway.sessions import RedisSessionStore, Session
from services.contract.errors import NotReadyError, SessionBusyError
from services.runtime.embedding_store import EmbeddingCache
from services.runtime.redis_client import connect, redis_errors
from services.runtime.redis_cluster import ResilientRedisCluster

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio, pytest.mark.timeout(120)]

FP = "fingerprint-cluster"
WORKERS = 6


@pytest.fixture(scope="module")
def cluster():
    with redis_cluster(masters=3) as running:
        yield running


@pytest_asyncio.fixture
async def client(cluster):
    r = connect(cluster.url)
    assert isinstance(r, ResilientRedisCluster)
    try:
        yield r
    finally:
        await r.aclose()


def _namespace() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def _owner(cluster, slot: int):
    """The master serving `slot` now, and its node id."""
    with contextlib.closing(cluster.masters()[0].client()) as any_node:
        for start, end, master, *_replicas in any_node.execute_command("CLUSTER SLOTS"):
            if start <= slot <= end:
                [node] = [n for n in cluster.nodes if n.port == int(master[1])]
                return node, master[2].decode()
    raise AssertionError(f"slot {slot} has no master")


def _node_id(node) -> str:
    with contextlib.closing(node.client()) as c:
        return c.execute_command("CLUSTER MYID").decode()


# -------------------------------------------------------------------------------------------- embedding cache


async def test_put_get_exists_across_slots_and_masters(cluster, client):
    cache = EmbeddingCache(client, FP, default_ttl_s=600)
    ns = _namespace()
    keys = [f"{ns}:emb:v1:{i:04d}" for i in range(48)]
    tensors = {key: torch.randn(8, 16).to(torch.bfloat16) for key in keys}
    for key, tensor in tensors.items():
        await cache.put(key, tensor)

    # The keys really are spread: every master holds some of them.
    per_master = [len(master.scan_keys(f"{ns}:*")) for master in cluster.masters()]
    assert len(per_master) == 3 and all(per_master) and sum(per_master) == len(keys)
    assert sorted(cluster.scan_keys(f"{ns}:*")) == sorted(k.encode() for k in keys)
    assert len({key_slot(k.encode()) for k in keys}) > 40

    absent = [f"{ns}:emb:v1:absent-{i}" for i in range(8)]
    asked = [k for pair in zip(keys, absent * 6, strict=False) for k in pair]
    assert await cache.exists(asked) == [k in tensors for k in asked]
    got = await asyncio.gather(*(cache.get(key) for key in keys))
    assert all(torch.equal(g, tensors[k]) for g, k in zip(got, keys, strict=True))
    assert await cache.get(absent[0]) is None
    assert 0 < await client.ttl(keys[0]) <= 600

    # A corrupt value is a miss and is removed, as on one Redis.
    await client.set(keys[1], b"garbage")
    assert await cache.get(keys[1]) is None and await cache.exists([keys[1]]) == [False]


async def test_single_flight_on_the_cluster(client):
    cache = EmbeddingCache(client, FP)
    ns = _namespace()
    calls: dict[str, int] = {}

    def compute_for(key: str):
        async def compute() -> torch.Tensor:
            calls[key] = calls.get(key, 0) + 1
            await asyncio.sleep(0.05)
            return torch.full((4, 4), float(len(calls)))
        return compute

    keys = [f"{ns}:emb:v1:{i}" for i in range(6)]
    results = await asyncio.gather(*(cache.get_or_compute(key, compute_for(key)) for key in keys for _ in range(5)))
    assert calls == dict.fromkeys(keys, 1)
    assert cache.single_flight_joins == len(keys) * 4 and not any(hit for _, hit in results)
    again = await asyncio.gather(*(cache.get_or_compute(key, compute_for(key)) for key in keys))
    assert all(hit for _, hit in again) and calls == dict.fromkeys(keys, 1)


async def test_moved_and_ask_during_a_slot_migration(cluster, client):
    """A slot moves from one master to another while the client holds the old slot map: it follows ASK during the
    migration and MOVED after it, with no error and without being told."""
    cache = EmbeddingCache(client, FP)
    tag = f"{{{uuid.uuid4().hex[:8]}}}"
    before, during = f"{tag}:emb:v1:before", f"{tag}:emb:v1:during"
    slot = key_slot(before.encode())
    await cache.put(before, torch.ones(2, 2))  # the client now has the slot map
    source, source_id = _owner(cluster, slot)
    target = next(m for m in cluster.masters() if m.port != source.port)
    target_id = _node_id(target)
    with contextlib.closing(source.client()) as src, contextlib.closing(target.client()) as dst:
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
        # A key the source does not hold is answered with ASK: written to, and read from, the target.
        await cache.put(during, torch.zeros(3, 3))
        assert dst.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 1
        assert torch.equal(await cache.get(during), torch.zeros(3, 3))
        assert torch.equal(await cache.get(before), torch.ones(2, 2))  # still on the source
        src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", before)
        for node in (target, source, *[m for m in cluster.masters() if m.port not in (source.port, target.port)]):
            with contextlib.closing(node.client()) as c:
                c.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
        assert src.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 0
    # The client still sends the slot to the source, which answers MOVED.
    assert client.nodes_manager.get_node_from_slot(slot).port == source.port
    assert torch.equal(await cache.get(before), torch.ones(2, 2))
    assert client.nodes_manager.get_node_from_slot(slot).port == target.port
    assert await cache.exists([before, during]) == [True, True]


# ------------------------------------------------------------------------------------------------- sessions


async def test_session_store_and_lock_on_the_cluster(cluster, client):
    store = RedisSessionStore(client, _namespace(), ttl_s=60)
    ids = [f"s{i}" for i in range(12)]
    for session_id in ids:
        await store.save(Session(session_id, f"system {session_id}"))
    assert [(await store.load(i)).system_message for i in ids] == [f"system {i}" for i in ids]
    # Sessions spread over the masters; each one's lock is its own key (one key per command, any slot).
    assert len({key_slot(store._key(i).encode()) for i in ids}) > 6
    async with store.lock("s1", hold_s=10):
        with pytest.raises(SessionBusyError):
            async with store.lock("s1", hold_s=10):
                pass
        async with store.lock("s2", hold_s=10):
            pass
    async with store.lock("s1", hold_s=10):  # released by the EVAL compare-and-delete
        pass
    assert cluster.scan_keys(f"{store.namespace}:*:lock") == []


# ------------------------------------------------------------------------------------------------- failures


@pytest.mark.parametrize("full_coverage", [True, False], ids=["full-coverage", "partial-coverage"])
async def test_a_master_killed_under_load_fails_over_without_errors(full_coverage):
    """3 masters with a replica each (1 s node timeout). Workers keep putting, getting and looking up keys in every
    slot while one master is SIGKILLed: its replica is promoted, and calls stall through the failover (retried
    for `CLUSTER_RETRY_BUDGET_S` from their first failure), then succeed. With `cluster-require-full-coverage yes`
    the whole cluster answers CLUSTERDOWN until the promotion, which the client retries too. Keys the replica had
    not yet received are misses, never errors.

    A promotion takes 2-3 s here (1 s to declare the master failed, then an election), about the retry budget:
    a call whose retries run out fails UNAVAILABLE (NotReadyError), and its worker's next round then lands on the
    new topology, so at most one round per worker may fail (none did in our runs); none after the promotion."""
    with redis_cluster(masters=3, replicas_per_master=1, full_coverage=full_coverage) as cluster:
        # Two clients, so that the pipelines-only one cannot lean on the other's slot map refreshes.
        clients = [connect(cluster.url), connect(cluster.url)]
        caches = [EmbeddingCache(c, FP) for c in clients]
        ns = _namespace()
        value = torch.randn(16, 16)
        outcomes: list[tuple[float, float, str]] = []  # (start, seconds, "ok" | error type)
        stop = asyncio.Event()

        async def worker(w: int) -> None:
            i = 0
            while not stop.is_set():
                key = f"{ns}:emb:v1:{w}-{i}"
                recent = [f"{ns}:emb:v1:{w}-{j}" for j in range(max(0, i - 8), i + 1)]
                cache = caches[w % 2]
                start = time.monotonic()
                try:
                    with redis_errors("embedding cache"):
                        if w % 2:  # pipelines only (a vision replica that only answers Lookup)
                            await cache.exists(recent)
                        else:
                            await cache.put(key, value)
                            got = await cache.get(key)
                            assert got is None or torch.equal(got, value)
                            await cache.exists(recent)
                    outcomes.append((start, time.monotonic() - start, "ok"))
                except NotReadyError:
                    outcomes.append((start, time.monotonic() - start, "UNAVAILABLE"))
                i += 1
                await asyncio.sleep(0.01)

        try:
            workers = [asyncio.create_task(worker(w)) for w in range(WORKERS)]
            await asyncio.sleep(1.0)
            victim = cluster.masters()[0]
            [replica] = cluster.replicas_of(victim)
            killed = time.monotonic()
            cluster.kill(victim)
            while not (cluster.role(replica)[:1] == ["master"] and cluster.healthy()):
                assert time.monotonic() - killed < 20, "the replica was not promoted"
                await asyncio.sleep(0.05)
            promoted = time.monotonic() - killed
            assert replica in cluster.masters() and victim not in cluster.masters()
            await asyncio.sleep(1.5)  # and keep going on the new topology
            stop.set()
            await asyncio.gather(*workers)
        finally:
            for c in clients:
                await c.aclose()

    failed = [o for o in outcomes if o[2] != "ok"]
    stall = max(seconds for _, seconds, _ in outcomes)
    after = [o for o in outcomes if o[0] > killed + promoted]
    print(f"failover ({'full' if full_coverage else 'partial'} coverage): promoted after {promoted:.2f}s; "
          f"{len(outcomes)} rounds, {len(failed)} UNAVAILABLE, longest round {stall:.2f}s")
    assert after and all(o[2] == "ok" for o in after)
    assert len(failed) <= WORKERS, failed
