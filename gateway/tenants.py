"""Tenants: who calls the gateway, what each may do, and the scope of their caches.

A tenant is a name with optional limits. It comes from (the first that is configured):

1. the API-key file (`--api-keys-file`): the bearer key a call carries names its tenant;
2. the single bearer token (`--api-token-file` / `INTERNVL_API_TOKEN`): every caller is the tenant `default`;
3. mutual TLS on the gateway's gRPC server (`--tls-client-ca`), neither of the above: the client certificate's
   subject common name (CN) is the tenant (gRPC only: the HTTP API is plain HTTP, its callers are `anonymous`);
4. nothing: every caller is the tenant `anonymous`.

The key file is JSON, each tenant's keys and settings under its name:

    {"tenants": {"search": {"keys": ["<key>", ...], "rate": 5, "burst": 10, "max_concurrent": 4,
                            "priority": "standard"}}}

`rate` is requests per second (a token bucket holding `burst` requests, default ceil(rate)), `max_concurrent` the
requests answered at once; both absent means unlimited. `priority` (critical, standard or sheddable; absent: the
gateway's --default-priority) is the default priority of the tenant's requests. Keys are found by their SHA-256 (a dict lookup on a
digest, so no comparison depends on how much of a guess matches); the file's plain keys are not kept.

`current()` is the tenant of the request being served (a context variable the transports set), and `salt(name)`
its cache salt: a digest of the name, or "" for `anonymous` (the unsalted scope every caller shared before tenants).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from services.contract.errors import InvalidArgumentError
from services.contract.priority import LABELS as PRIORITY_LABELS
from services.contract.priority import Priority
from services.runtime import logs

ANONYMOUS = "anonymous"
DEFAULT = "default"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MIN_KEY_CHARS = 16
_SETTINGS = frozenset({"keys", "rate", "burst", "max_concurrent", "priority"})
_SALT_CONTEXT = b"internvl-tenant-cache-salt\0"


@dataclass(frozen=True)
class Tenant:
    """One caller's name and limits; None: unlimited."""

    name: str
    # Requests per second, refilled continuously into a bucket of `burst` requests.
    rate: float | None = None
    burst: int | None = None
    max_concurrent: int | None = None
    # The default priority of this tenant's requests; None: the gateway's --default-priority.
    priority: Priority | None = None

    @property
    def bucket_size(self) -> int:
        """The requests the rate bucket holds: `burst`, else ceil(rate) (at least 1)."""
        return self.burst if self.burst is not None else max(1, math.ceil(self.rate or 1))


# The tenant of the request being served; None until the transport named it (or outside any request).
CURRENT: contextvars.ContextVar[Tenant | None] = contextvars.ContextVar("internvl_tenant", default=None)


def current() -> Tenant:
    """The tenant of the request being served (`anonymous` where none was named: a caller of the orchestrator
    without a transport)."""
    return CURRENT.get() or Tenant(ANONYMOUS)


def enter(tenant: Tenant) -> None:
    """Makes `tenant` the current one, and its name that of every log line, for the rest of this context.

    For a transport that serves each call in a task of its own (gRPC aio): the value then lives as long as the call,
    so the access line logged after the handler returns carries it too.
    """
    CURRENT.set(tenant)
    logs.TENANT.set(tenant.name)


@contextlib.contextmanager
def scope(tenant: Tenant) -> Iterator[None]:
    """Within the block, `tenant` is the current one and names every log line; the previous ones are back after."""
    token, log_token = CURRENT.set(tenant), logs.TENANT.set(tenant.name)
    try:
        yield
    finally:
        # A reset from another context fails (see logs.request_scope): each is skipped on its own.
        with contextlib.suppress(ValueError):
            logs.TENANT.reset(log_token)
        with contextlib.suppress(ValueError):
            CURRENT.reset(token)


def salt(name: str) -> str:
    """The cache salt of tenant `name`: "" for `anonymous`, else 32 hex digits of a SHA-256 of the name.

    A digest rather than the name: fixed length, and the LLM and vision services (their logs, their cache keys) never
    see tenant names. No secret is needed: callers never choose or see a salt, the gateway sets it from the tenant.
    """
    if name == ANONYMOUS:
        return ""
    return hashlib.sha256(_SALT_CONTEXT + name.encode()).hexdigest()[:32]


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyDirectory:
    """The tenants of an API-key file, found by a key's digest."""

    def __init__(self, by_digest: Mapping[bytes, Tenant]):
        self._by_digest = dict(by_digest)
        self.tenants = tuple({t.name: t for t in self._by_digest.values()}.values())

    def find(self, key: str) -> Tenant | None:
        """The tenant `key` belongs to; None for a key the file does not hold."""
        return self._by_digest.get(key_digest(key))


def load_keys_file(path: str) -> KeyDirectory:
    """The tenants of the JSON file at `path`; InvalidArgumentError naming the file and the problem."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"--api-keys-file {path}: cannot read it ({exc})") from None
    try:
        return parse_keys(text)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"--api-keys-file {path}: {exc}") from None


def parse_keys(text: str) -> KeyDirectory:
    """The tenants of an API-key file's text (format in the module docstring)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InvalidArgumentError(f"not valid JSON ({exc})") from None
    if not isinstance(data, dict) or set(data) != {"tenants"} or not isinstance(data["tenants"], dict):
        raise InvalidArgumentError('expected one object {"tenants": {"<name>": {"keys": [...], ...}, ...}}')
    if not data["tenants"]:
        raise InvalidArgumentError("names no tenant")
    by_digest: dict[bytes, Tenant] = {}
    for name, settings in data["tenants"].items():
        tenant, keys = _tenant(name, settings)
        for key in keys:
            digest = key_digest(key)
            if digest in by_digest:
                raise InvalidArgumentError(f"tenant {name!r}: a key is listed twice (also under "
                                           f"{by_digest[digest].name!r}); each key names one tenant")
            by_digest[digest] = tenant
    return KeyDirectory(by_digest)


def _tenant(name: str, settings: object) -> tuple[Tenant, list[str]]:
    if not NAME_PATTERN.match(name) or name == ANONYMOUS:
        raise InvalidArgumentError(f"tenant name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (and not "
                                   f"{ANONYMOUS!r})")
    if not isinstance(settings, dict):
        raise InvalidArgumentError(f"tenant {name!r}: expected an object of settings, got {type(settings).__name__}")
    unknown = sorted(set(settings) - _SETTINGS)
    if unknown:
        raise InvalidArgumentError(f"tenant {name!r}: unknown setting(s) {', '.join(unknown)}; known: "
                                   f"{', '.join(sorted(_SETTINGS))}")
    keys = settings.get("keys")
    if not isinstance(keys, list) or not keys:
        raise InvalidArgumentError(f"tenant {name!r}: 'keys' must be a non-empty list of strings")
    for key in keys:
        if not isinstance(key, str) or len(key) < MIN_KEY_CHARS or not key.isprintable() or " " in key:
            raise InvalidArgumentError(f"tenant {name!r}: each key must be a string of at least {MIN_KEY_CHARS} "
                                       "printable characters without spaces")
    rate = _number(name, settings, "rate", float, minimum=0.0, strict=True)
    burst = _number(name, settings, "burst", int, minimum=1)
    if burst is not None and rate is None:
        raise InvalidArgumentError(f"tenant {name!r}: 'burst' needs a 'rate'")
    priority = settings.get("priority")
    if priority is not None and priority not in PRIORITY_LABELS:
        raise InvalidArgumentError(f"tenant {name!r}: 'priority' must be one of {', '.join(PRIORITY_LABELS)}, got "
                                   f"{priority!r}")
    return Tenant(name, rate, burst, _number(name, settings, "max_concurrent", int, minimum=1),
                  None if priority is None else Priority.parse(priority)), keys


def _number(name: str, settings: dict, field: str, kind: type, minimum: float, strict: bool = False):
    """`settings[field]` as `kind` (None when absent), at least `minimum` (above it when `strict`)."""
    value = settings.get(field)
    if value is None:
        return None
    wrong_type = isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int)
    if wrong_type or not math.isfinite(value) or value < minimum or (strict and value == minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        what = "a number" if kind is float else "an integer"
        raise InvalidArgumentError(f"tenant {name!r}: {field!r} must be {what} {bound}, got {value!r}")
    return kind(value)
