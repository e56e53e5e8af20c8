"""Session stores: the Redis one (real redis-server) and the in-process one keep the same contract."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from gateway.sessions import MemorySessionStore, RedisSessionStore, Session
from services.contract.conversation import ImageRef, Turn, VideoRef
from services.contract.errors import InvalidArgumentError, SessionBusyError, SessionNotFoundError

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

TURNS = (
    Turn(("Describe it.", ImageRef("ns:emb:v1:aa", 5)), "A cat."),
    Turn((VideoRef((ImageRef("ns:emb:v1:f1", 1), ImageRef("ns:emb:v1:f2", 1))), "And now?"), "It runs."),
    Turn((ImageRef("ns:combined:v1:cc", 3, (ImageRef("k1", 2), ImageRef("k2", 1))), "Both?"), ""),
)


# Only the Redis store needs redis-server (asked for here, not in the signature, so the memory one is no e2e test).
@pytest_asyncio.fixture(params=[pytest.param("redis", marks=pytest.mark.e2e), "memory"])
async def store(request):
    if request.param == "memory":
        yield MemorySessionStore(ttl_s=60)
        return
    redis_url = request.getfixturevalue("redis_url")
    redis_store = RedisSessionStore(Redis.from_url(redis_url), f"test{uuid.uuid4().hex[:8]}", ttl_s=60)
    yield redis_store
    await redis_store.close()


async def test_round_trip_and_not_found(store):
    session = Session("abc-1", "Be brief.", TURNS)
    await store.save(session)
    assert await store.load("abc-1") == session
    with pytest.raises(SessionNotFoundError, match="'abc-2' does not exist or has expired"):
        await store.load("abc-2")
    with pytest.raises(InvalidArgumentError, match="session_id must be"):
        await store.load("no spaces allowed")


async def test_a_session_keeps_its_adapter_and_an_older_record_is_the_base(store):
    session = Session("abc-3", None, TURNS, adapter="latex-ocr")
    await store.save(session)
    assert (await store.load("abc-3")).adapter == "latex-ocr"
    # Stored before adapters existed: no "adapter" field, so the base.
    legacy = '{"v":1,"system_message":null,"turns":[]}'
    assert Session.from_json("old", legacy) == Session("old", None, (), "")
    with pytest.raises(SessionNotFoundError, match="unreadable"):
        Session.from_json("bad", '{"v":1,"system_message":null,"turns":[],"adapter":7}')


async def test_one_round_at_a_time(store):
    async with store.lock("s1", hold_s=10):
        with pytest.raises(SessionBusyError):
            async with store.lock("s1", hold_s=10):
                pass
        async with store.lock("s2", hold_s=10):  # other sessions are not affected
            pass
    async with store.lock("s1", hold_s=10):  # released
        pass


async def test_redis_sessions_expire_and_locks_time_out(redis_url):
    redis = Redis.from_url(redis_url)
    store = RedisSessionStore(redis, f"test{uuid.uuid4().hex[:8]}", ttl_s=1)
    await store.save(Session("s", None, TURNS[:1]))
    assert 0 < await redis.ttl(store._key("s")) <= 1
    await asyncio.sleep(1.2)
    with pytest.raises(SessionNotFoundError):
        await store.load("s")
    # A lock left by a gateway that died mid-round frees itself.
    await redis.set(store._key("t") + ":lock", "someone-else", px=200)
    await asyncio.sleep(0.3)
    async with store.lock("t", hold_s=5):
        pass
    await store.close()


@pytest.mark.parametrize("raw", [
    b"\x80not json", b"[1, 2]", b'{"v": 1}', b'{"v": 1, "turns": [{"user": [7], "assistant": ""}]}',
    b'{"v": 1, "turns": [], "system_message": {"a": 1}}', b'{"v": 1, "turns": [{"user": [{"image": {}}]}]}',
])
async def test_an_unreadable_stored_session_is_not_found_not_an_internal_error(redis_url, raw):
    """Whatever damaged the value, the caller hears that this session is gone and can start a new one."""
    redis = Redis.from_url(redis_url)
    store = RedisSessionStore(redis, f"test{uuid.uuid4().hex[:8]}", ttl_s=60)
    await redis.set(store._key("broken"), raw)
    with pytest.raises(SessionNotFoundError, match="'broken' is stored in an unreadable form; start a new session"):
        await store.load("broken")
    await redis.set(store._key("old"), b'{"v": 0, "turns": []}')
    with pytest.raises(SessionNotFoundError, match="incompatible gateway version"):
        await store.load("old")
    await store.close()


async def test_another_tenants_session_is_not_found_with_a_missing_ones_message(store):
    await store.save(Session("s1", "system", tenant="alpha"))
    assert await store.load("s1", "alpha") == Session("s1", "system", tenant="alpha")
    with pytest.raises(SessionNotFoundError) as other:
        await store.load("s1", "beta")
    with pytest.raises(SessionNotFoundError) as anonymous:
        await store.load("s1")
    with pytest.raises(SessionNotFoundError) as missing:
        await store.load("s2", "beta")
    assert str(other.value) == str(anonymous.value) == str(missing.value).replace("'s2'", "'s1'")
    # Nor can another tenant tell that the session is busy: its lock is another.
    async with store.lock("s1", 5, "alpha"), store.lock("s1", 5, "beta"):
        with pytest.raises(SessionBusyError):
            async with store.lock("s1", 5, "alpha"):
                pass
