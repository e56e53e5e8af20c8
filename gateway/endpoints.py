"""The replicas behind one `--vision-target` / `--llm-target`: discovered, one channel each, readiness from health.

Target forms (as gRPC spells them): `dns:///name:port` (a headless Kubernetes Service: one address per ready pod),
`ipv4:a:port,b:port` and `ipv6:[a]:port,[b]:port` lists, or one `host:port`. Names are re-resolved every
`resolve_interval_s` and soon after a call failed, so pods an autoscaler adds or removes are seen within seconds.
Each address gets a channel of its own (the router, not gRPC's balancer, picks the replica) and a health loop asking
`grpc.health.v1.Health/Check` for the service's readiness name; a replica still loading or draining is not ready,
and neither is one that a call just found UNAVAILABLE, until its next check says SERVING. A replica whose check gets
no answer within `HEALTH_TIMEOUT_S` (paused, hung, dead) is not ready and also `silent`: calls waiting for its first
reply stop waiting (see `gateway.clients`), so it is routed around within one interval plus that timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.contract.errors import InvalidArgumentError, NotReadyError
from services.runtime.host_port import split_host_port

log = logging.getLogger(__name__)

# Seconds a removed replica's channel lets its running calls finish (longer than any stream the gateway allows).
CLOSE_GRACE_S = 900.0
HEALTH_TIMEOUT_S = 2.0

ChannelFactory = Callable[[str, str | None], grpc.aio.Channel]
# (host, port) -> the IP addresses the host name has now ([] when it has none).
Resolver = Callable[[str, int], Awaitable[list[str]]]
# A replica's channel -> the fingerprint of the model it serves (GetModelInfo).
Fingerprint = Callable[[grpc.aio.Channel], Awaitable[str]]


async def resolve_dns(host: str, port: int) -> list[str]:
    """The system resolver's addresses for `host` (what a headless Service's DNS name lists: its ready pods)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        log.warning("cannot resolve %s (%s)", host, exc)
        return []
    return list(dict.fromkeys(info[4][0] for info in infos))


def parse_target(target: str) -> list[tuple[str, int]]:
    """The (host, port) pairs `target` names; `InvalidArgumentError` naming the target when it is malformed."""
    text = target.strip()
    if text.startswith("dns:"):
        # dns:///name:port, dns://authority/name:port (the authority is gRPC's DNS server; ours is the system's),
        # or dns:name:port.
        rest = text[4:]
        if rest.startswith("//"):
            rest = rest[2:].split("/", 1)[1] if "/" in rest[2:] else ""
        hosts = [rest]
    elif text.startswith(("ipv4:", "ipv6:")):
        hosts = [h for h in text[5:].split(",") if h]
    else:
        hosts = [text]
    if not hosts:
        raise InvalidArgumentError(f"target {target!r} names no address")
    return [_host_port(h, target) for h in hosts]


def _host_port(text: str, target: str) -> tuple[str, int]:
    try:
        return split_host_port(text)
    except ValueError:
        raise InvalidArgumentError(f"target {target!r}: {text!r} is not host:port") from None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@dataclass
class Endpoint:
    """One replica: `address` is `ip:port` (`[ip]:port` for IPv6), the same string on every gateway."""

    address: str
    channel: grpc.aio.Channel
    ready: bool = False
    in_flight: int = 0
    # The model it serves, learnt when it first reports SERVING.
    fingerprint: str | None = None
    checked: asyncio.Event = field(default_factory=asyncio.Event)
    # Set to have the health loop check at once rather than at its next interval.
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # Set while its health checks get no answer at all within HEALTH_TIMEOUT_S (a paused or hung process, a dead
    # one: not one that answers NOT_SERVING, which may be draining): calls still waiting for its first reply give up.
    silent: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None


class EndpointPool:
    """The current replicas of one target, their readiness and this gateway's calls in flight to each."""

    def __init__(self, name: str, target: str, health_service: str, channel_factory: ChannelFactory,
                 resolve_interval_s: float = 5.0, health_interval_s: float = 1.0,
                 on_change: Callable[[EndpointPool], None] | None = None, resolve: Resolver = resolve_dns,
                 fingerprint: Fingerprint | None = None):
        self.name = name
        self.target = target
        self.hosts = parse_target(target)
        self.health_service = health_service
        self.channel_factory = channel_factory
        self.resolve_interval_s = resolve_interval_s
        self.health_interval_s = health_interval_s
        # Called after readiness, membership or a load changes (metrics).
        self.on_change = on_change
        self.resolve = resolve
        # Every replica must serve the model the first ready one serves (keys and prompts depend on it): one that
        # serves another is never routed to.
        self.fingerprint = fingerprint
        self.model: str | None = None
        self.endpoints: dict[str, Endpoint] = {}
        self._resolve_now = asyncio.Event()
        self._refresher: asyncio.Task | None = None
        self._closing: set[asyncio.Task] = set()
        self._was_empty = False

    # -------------------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        await self.refresh()
        self._refresher = asyncio.ensure_future(self._refresh_forever())

    async def close(self) -> None:
        tasks = [t for t in (self._refresher, *(e.task for e in self.endpoints.values())) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(e.channel.close() for e in self.endpoints.values()),
                             *self._closing, return_exceptions=True)
        self.endpoints.clear()

    async def _refresh_forever(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._resolve_now.wait(), self.resolve_interval_s)
            self._resolve_now.clear()
            try:
                await self.refresh()
            except Exception:
                log.exception("%s pool: re-resolving %s failed", self.name, self.target)

    async def refresh(self) -> None:
        """Resolves the target and adds or removes endpoints to match."""
        found: dict[str, str | None] = {}  # address -> the host name to check TLS certificates against
        for host, port in self.hosts:
            if _is_ip(host):
                found[_address(host, port)] = None
                continue
            for ip in await self.resolve(host, port):
                found.setdefault(_address(ip, port), host)
        for address in [a for a in self.endpoints if a not in found]:
            self._remove(address)
        for address, host in found.items():
            if address not in self.endpoints:
                self._add(address, host)
        if not self.endpoints and not self._was_empty:
            log.warning("%s pool: %s resolves to no address", self.name, self.target)
        self._was_empty = not self.endpoints
        self._changed()

    def _add(self, address: str, host: str | None) -> None:
        endpoint = Endpoint(address, self.channel_factory(("ipv6:" if address.startswith("[") else "ipv4:") + address,
                                                          host))
        endpoint.task = asyncio.ensure_future(self._watch(endpoint))
        self.endpoints[address] = endpoint
        log.info("%s pool: replica %s added", self.name, address)

    def _remove(self, address: str) -> None:
        endpoint = self.endpoints.pop(address)
        if endpoint.task is not None:
            endpoint.task.cancel()
        closing = asyncio.ensure_future(endpoint.channel.close(CLOSE_GRACE_S))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        log.info("%s pool: replica %s removed", self.name, address)

    async def _watch(self, endpoint: Endpoint) -> None:
        stub = health_pb2_grpc.HealthStub(endpoint.channel)
        request = health_pb2.HealthCheckRequest(service=self.health_service)
        while True:
            try:
                reply = await stub.Check(request, timeout=HEALTH_TIMEOUT_S)
                endpoint.silent.clear()
                ready = reply.status == health_pb2.HealthCheckResponse.SERVING and await self._same_model(endpoint)
            except grpc.aio.AioRpcError as exc:
                ready = False
                if not endpoint.silent.is_set():
                    log.warning("%s pool: replica %s does not answer health checks (%s)", self.name,
                                endpoint.address, exc.code().name)
                    endpoint.silent.set()
            if ready != endpoint.ready:
                endpoint.ready = ready
                log.info("%s pool: replica %s is %s", self.name, endpoint.address, "ready" if ready else "not ready")
                self._changed()
            endpoint.checked.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(endpoint.wake.wait(), self.health_interval_s)
            endpoint.wake.clear()

    async def _same_model(self, endpoint: Endpoint) -> bool:
        if self.fingerprint is None:
            return True
        if endpoint.fingerprint is None:
            endpoint.fingerprint = await self.fingerprint(endpoint.channel)
            self.model = self.model or endpoint.fingerprint
            if endpoint.fingerprint != self.model:
                log.error("%s pool: replica %s serves model %s, not %s: it gets no calls", self.name,
                          endpoint.address, endpoint.fingerprint, self.model)
        return endpoint.fingerprint == self.model

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    # ------------------------------------------------------------------------------------------------ state

    def ready_loads(self) -> dict[str, int]:
        """Calls in flight from this gateway to each ready replica."""
        return {a: e.in_flight for a, e in self.endpoints.items() if e.ready}

    def suspect(self, address: str) -> None:
        """A call found `address` UNAVAILABLE: check its health and re-resolve the target now.

        It stays ready until that check says otherwise: a replica that answered UNAVAILABLE because its Redis blinked
        is still the right one for its keys, and the call that failed avoids it on its own retry.
        """
        endpoint = self.endpoints.get(address)
        if endpoint is not None:
            endpoint.wake.set()
        self._resolve_now.set()

    def unavailable(self, what: str) -> NotReadyError:
        """The error for a call that found no ready replica, saying why."""
        if not self.endpoints:
            return NotReadyError(f"no {what} replica ready: {self.target} resolves to no address")
        return NotReadyError(f"no {what} replica ready ({len(self.endpoints)} known, none serving); retry later")

    async def wait_checked(self, timeout_s: float) -> None:
        """Waits (up to `timeout_s`) until every current replica has had one health check."""
        pending = [e.checked.wait() for e in self.endpoints.values() if not e.checked.is_set()]
        if pending:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*pending), timeout_s)

    @contextlib.contextmanager
    def call(self, address: str) -> Iterator[Endpoint]:
        """Counts one call in flight on `address` for as long as the block runs."""
        endpoint = self.endpoints[address]
        endpoint.in_flight += 1
        self._changed()
        try:
            yield endpoint
        finally:
            endpoint.in_flight -= 1
            self._changed()
