"""Multi-round sessions, kept in Redis so that any gateway replica can continue any session.

A session holds its system message, the model it answers with (the base, or a LoRA adapter by name), and its rounds:
each round's user parts (text and image references, i.e. cache keys and tile counts, never pixels) and the assistant's
answer as the original stores it (cut at `<|im_end|>` and stripped). Replaying them gives the LLM service the same prompt prefix as the last round, so its prefix KV cache and
the embedding cache make the next round cheap. A session expires `ttl_s` after its last round.

A session belongs to the tenant that started it (`gateway.tenants`): its key holds the tenant's name (the
`anonymous` tenant's keys are those of before tenants), so another tenant's load, lock or save of the same id meets
another key: its session does not exist, with the very message of a missing one, and it cannot even tell that the
id is busy.

One round at a time: a round holds a short-lived lock (SET NX PX, released by compare-and-delete) so that two
concurrent rounds of one session cannot both append to the same history; the second gets SessionBusyError.

Every command touches one key (the lock's EVAL names only the lock), so on a Redis Cluster a session and its lock
may live in different slots: the keys carry no hash tag and read the same on one Redis and on a cluster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import redis.exceptions

from gateway.tenants import ANONYMOUS
from services.contract.conversation import ImageRef, Part, Turn, VideoRef
from services.contract.errors import InvalidArgumentError, SessionBusyError, SessionNotFoundError
from services.runtime.redis_client import RedisClient, redis_errors

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
# Deletes the lock only if it still holds our token (it may have expired and been taken by another round).
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


@dataclass(frozen=True)
class Session:
    id: str
    system_message: str | None = None
    turns: tuple[Turn, ...] = field(default=())
    # The LoRA adapter every round answers with; "" is the base.
    adapter: str = ""
    # The tenant it belongs to (kept in its key, not its value).
    tenant: str = ANONYMOUS

    def to_json(self) -> str:
        return json.dumps({"v": SCHEMA_VERSION, "system_message": self.system_message, "adapter": self.adapter,
                           "turns": [_turn_to_json(t) for t in self.turns]}, separators=(",", ":"))

    @classmethod
    def from_json(cls, session_id: str, raw: str | bytes) -> Session:
        try:
            data = json.loads(raw)
            version = data.get("v")
            if version == SCHEMA_VERSION:
                system_message = data.get("system_message")
                if system_message is not None and not isinstance(system_message, str):
                    raise TypeError("system_message is not a string")
                adapter = data.get("adapter", "")  # absent: stored before adapters existed, the base
                if not isinstance(adapter, str):
                    raise TypeError("adapter is not a string")
                return cls(session_id, system_message, tuple(_turn_from_json(t) for t in data["turns"]), adapter)
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:  # JSON errors: ValueError
            # Another writer or a damaged store: the caller can only start over, as after an expiry.
            log.warning("session %s has an unreadable stored value (%s: %s)", session_id, type(exc).__name__, exc)
            raise SessionNotFoundError(f"session {session_id!r} is stored in an unreadable form; "
                                       "start a new session") from None
        raise SessionNotFoundError(f"session {session_id!r} was stored by an incompatible gateway version "
                                   f"(schema {version!r}); start a new session")


def new_session_id() -> str:
    return uuid.uuid4().hex


def check_session_id(session_id: str) -> str:
    if not _ID.match(session_id):
        raise InvalidArgumentError("session_id must be 1-128 characters of letters, digits, '.', '_' or '-'")
    return session_id


def owned_id(tenant: str, session_id: str) -> str:
    """Where `tenant`'s session `session_id` is kept: the id itself for `anonymous`, else `t.<tenant>.<id>` (hex of the
    name's bytes, so no name can make one tenant's ids read as another's)."""
    check_session_id(session_id)
    return session_id if tenant == ANONYMOUS else f"t.{tenant.encode().hex()}.{session_id}"


def not_found(session_id: str, ttl_s: int) -> SessionNotFoundError:
    """The one error of an unknown, expired or another tenant's session."""
    return SessionNotFoundError(f"session {session_id!r} does not exist or has expired (sessions expire {ttl_s} s "
                                "after their last round); start a new one without session_id")


class RedisSessionStore:
    def __init__(self, redis: RedisClient, namespace: str, ttl_s: int):
        self.redis = redis
        self.namespace = namespace
        self.ttl_s = ttl_s

    def _key(self, session_id: str) -> str:
        return f"{self.namespace}:session:v{SCHEMA_VERSION}:{session_id}"

    async def load(self, session_id: str, tenant: str = ANONYMOUS) -> Session:
        """`tenant`'s session `session_id`; SessionNotFoundError when it has none of that id (another's included)."""
        with redis_errors("session store"):
            raw = await self.redis.get(self._key(owned_id(tenant, session_id)))
        if raw is None:
            raise not_found(session_id, self.ttl_s)
        return dataclasses.replace(Session.from_json(session_id, raw), tenant=tenant)

    async def save(self, session: Session) -> None:
        with redis_errors("session store"):
            await self.redis.set(self._key(owned_id(session.tenant, session.id)), session.to_json(), ex=self.ttl_s)

    @contextlib.asynccontextmanager
    async def lock(self, session_id: str, hold_s: float, tenant: str = ANONYMOUS) -> AsyncIterator[None]:
        key = self._key(owned_id(tenant, session_id)) + ":lock"
        token = secrets.token_hex(8)
        with redis_errors("session store"):
            taken = await self.redis.set(key, token, nx=True, px=max(1000, int(hold_s * 1000)))
        if not taken:
            raise SessionBusyError(f"session {session_id!r} is answering another round; wait for it to finish")
        try:
            yield
        finally:
            try:
                await self.redis.eval(_RELEASE, 1, key, token)
            except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as exc:
                # The lock expires by itself. (redis-py's cluster errors, such as a slot without a master, are no
                # RedisErrors.)
                log.warning("could not release the lock of session %s: %s", session_id, exc)

    async def close(self) -> None:
        await self.redis.aclose()


class MemorySessionStore:
    """The same contract in this process only: for a single gateway without Redis (demos, tests)."""

    def __init__(self, ttl_s: int):
        self.ttl_s = ttl_s
        self._sessions: dict[str, tuple[float, str]] = {}
        self._locked: set[str] = set()

    async def load(self, session_id: str, tenant: str = ANONYMOUS) -> Session:
        key = owned_id(tenant, session_id)
        entry = self._sessions.get(key)
        if entry is None or entry[0] < time.monotonic():
            self._sessions.pop(key, None)
            raise not_found(session_id, self.ttl_s)
        return dataclasses.replace(Session.from_json(session_id, entry[1]), tenant=tenant)

    async def save(self, session: Session) -> None:
        now = time.monotonic()
        self._sessions = {k: v for k, v in self._sessions.items() if v[0] >= now}
        self._sessions[owned_id(session.tenant, session.id)] = (now + self.ttl_s, session.to_json())

    @contextlib.asynccontextmanager
    async def lock(self, session_id: str, hold_s: float, tenant: str = ANONYMOUS) -> AsyncIterator[None]:
        key = owned_id(tenant, session_id)
        if key in self._locked:
            raise SessionBusyError(f"session {session_id!r} is answering another round; wait for it to finish")
        self._locked.add(key)
        try:
            yield
        finally:
            self._locked.discard(key)

    async def close(self) -> None:
        self._sessions.clear()


SessionStore = RedisSessionStore | MemorySessionStore


# ------------------------------------------------------------------------------------------- stored form


def _ref_to_json(ref: ImageRef) -> dict:
    out: dict = {"key": ref.key, "tiles": ref.num_tiles}
    if ref.combined:
        out["combined"] = [_ref_to_json(r) for r in ref.combined]
    return out


def _ref_from_json(raw: dict) -> ImageRef:
    return ImageRef(str(raw["key"]), int(raw["tiles"]), tuple(_ref_from_json(r) for r in raw.get("combined", ())))


def _part_to_json(part: Part) -> dict:
    if isinstance(part, str):
        return {"text": part}
    if isinstance(part, ImageRef):
        return {"image": _ref_to_json(part)}
    return {"video": [_ref_to_json(f) for f in part.frames]}


def _part_from_json(raw: dict) -> Part:
    if "text" in raw:
        return str(raw["text"])
    if "image" in raw:
        return _ref_from_json(raw["image"])
    return VideoRef(tuple(_ref_from_json(f) for f in raw["video"]))


def _turn_to_json(turn: Turn) -> dict:
    return {"user": [_part_to_json(p) for p in turn.user_parts], "assistant": turn.assistant_text}


def _turn_from_json(raw: dict) -> Turn:
    return Turn(tuple(_part_from_json(p) for p in raw["user"]), str(raw["assistant"]))
