"""gRPC clients of the vision and LLM services: the one place the gateway reads or builds their messages.

Each client holds an `EndpointPool` (one channel per replica, readiness from health checks) and a `Router` that picks
the replica of every call: `Generate` by the conversation's prefix identity, so a session's turns (and a stateless
conversation that resends its history) land where the prefix KV cache holds their earlier turns; `Encode` by the
first item's cache key, so concurrent encodes of one new image meet in one replica's single-flight. A call that fails
UNAVAILABLE (before any token, for Generate) moves to the key's next choice, and so does one whose replica stops
answering (a vision attempt past `--vision-attempt-timeout-s`, a Generate waiting for its first token on a replica
whose health checks go unanswered); each replica's circuit breaker (`gateway.circuit`) counts these failures.
Failed calls become domain errors through the one error table (`services.runtime.grpc_errors.error_from_rpc`), with
the callee's caller-safe message; a deadline is passed on every call so the caller's deadline reaches both services.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import grpc
from internvl.llm.v1 import llm_pb2, llm_pb2_grpc
from internvl.vision.v1 import vision_pb2, vision_pb2_grpc

from gateway.backends import Embeddings, GenerateFinish
from gateway.chat_response import Delta
from gateway.circuit import Breakers, BreakerSettings, State
from gateway.config import GatewayConfig
from gateway.endpoints import HEALTH_TIMEOUT_S, Endpoint, EndpointPool
from gateway.metrics import GatewayMetrics
from gateway.routing import Policy, Router
from services.contract.conversation import Conversation, GenerateRequest
from services.contract.encoding import EncodedItem, MediaItem, PreprocessOptions
from services.contract.errors import (
    DeadlineExceededError,
    EmbeddingsMissingError,
    NotFoundError,
    NotReadyError,
)
from services.contract.model_info import ModelInfo
from services.contract.priority import Priority
from services.contract.sampling import SamplingParams
from services.contract.service_names import LLM_SERVICE, VISION_SERVICE
from services.runtime.calls import Metadata, outgoing
from services.runtime.grpc_errors import error_from_rpc
from services.runtime.grpc_server import DEFAULT_MAX_MESSAGE_BYTES, channel_options
from services.runtime.tensor_wire import tensor_chunks
from services.runtime.tls import ClientTls, secure_or_insecure_channel

log = logging.getLogger(__name__)

# Inline embeddings are sent in chunks of this size (the LLM service's gRPC limit is 16 MiB).
INLINE_CHUNK_BYTES = 1 << 20
# Attempts of an idempotent vision call failing UNAVAILABLE, and the pause before the n-th retry (n times this).
RETRY_ATTEMPTS = 3
RETRY_BACKOFF_S = 0.05
# Rounds over the LLM pool's ready replicas a Generate failing UNAVAILABLE before its first token gets, and the pause
# between them.
GENERATE_ROUNDS = 2
GENERATE_RETRY_PAUSE_S = 0.2
# How long a new pool waits for each replica's first health check before routing (a replica that has not answered
# by then is simply not ready yet).
HEALTH_FIRST_CHECK_S = 2.0
# How often a Generate waiting for its first token on a silent replica looks again for another ready replica.
SILENT_RECHECK_S = 0.5
T = TypeVar("T")


def replica_channel(target: str, host: str | None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                    tls: ClientTls | None = None) -> grpc.aio.Channel:
    """An aio channel to one replica (`ipv4:ip:port`); with TLS, its certificate is checked against `host`, the
    name the address was resolved from (unless the TLS settings name the server themselves)."""
    options = [*channel_options(max_message_bytes),
               # Notice a dead replica between calls.
               ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000),
               # A restarted replica (minutes to load a large model) is used within seconds of serving again, not
               # after gRPC's default backoff of up to 120 s between reconnect attempts.
               ("grpc.initial_reconnect_backoff_ms", 500), ("grpc.max_reconnect_backoff_ms", 5_000)]
    if tls is not None and host is not None and tls.server_name is None:
        options.append(("grpc.ssl_target_name_override", host))
    return secure_or_insecure_channel(target, options, tls)


# ----------------------------------------------------------------------------------------------------- vision


class VisionClient:
    """Lookup, Encode and FetchEmbeddings are idempotent (keys are content addresses): a call that fails UNAVAILABLE
    (a replica died, drained or lost its cache connection), or that a replica has not answered within
    `attempt_timeout_s` (paused, hung, far behind), is tried again, up to `RETRY_ATTEMPTS` times in all, within the
    caller's deadline, on another ready replica while there is one (the same key's next choice for Encode)."""

    def __init__(self, pool: EndpointPool, router: Router, on_retry: Callable[[str], None] | None = None,
                 attempt_timeout_s: float | None = None):
        self.pool = pool
        self.router = router
        # Called with the method name before each retry (metrics).
        self.on_retry = on_retry
        # The longest one attempt may wait for its replica's answer; None: the caller's deadline.
        self.attempt_timeout_s = attempt_timeout_s

    async def close(self) -> None:
        await self.pool.close()

    def preferred(self, key: str) -> str | None:
        """The replica an Encode routed by `key` would go to now (None: none is ready)."""
        return self.router.preferred(key.encode())

    async def _retrying(self, method: str,
                        call: Callable[[vision_pb2_grpc.VisionServiceStub, float | None, Metadata], Awaitable[T]],
                        timeout: float | None, key: str | None = None) -> T:
        """`call(stub, seconds left, metadata)` on a ready replica, retried as the class says."""
        end = None if timeout is None else time.monotonic() + timeout
        tried: set[str] = set()
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                raise DeadlineExceededError("the deadline passed while waiting for the vision service")
            # The attempt's own timeout, when it ends before the caller's deadline: its expiry is the replica's fault.
            cut = self.attempt_timeout_s if self.attempt_timeout_s is not None and (
                left is None or self.attempt_timeout_s < left) else None
            address = self.router.pick(None if key is None else key.encode(), tried)
            try:
                with _watching(self.router, address):
                    try:
                        with (self.pool.call(address) as endpoint,
                              outgoing(f"{VISION_SERVICE}/{method}", address) as metadata):
                            return await call(vision_pb2_grpc.VisionServiceStub(endpoint.channel),
                                              left if cut is None else cut, metadata)
                    except grpc.aio.AioRpcError as exc:
                        if cut is not None and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                            raise NotReadyError(f"a vision replica did not answer {method} within {cut:g} s "
                                                "(--vision-attempt-timeout-s); retry later") from None
                        raise error_from_rpc(exc, "the vision service") from None
            except NotReadyError as error:
                if attempt == RETRY_ATTEMPTS:
                    raise
                log.info("vision %s on %s failed (%s); trying again (attempt %d of %d)", method, address, error,
                         attempt + 1, RETRY_ATTEMPTS)
                self.pool.suspect(address)
                tried.add(address)
            if self.on_retry is not None:
                self.on_retry(method)
            await asyncio.sleep(RETRY_BACKOFF_S * attempt)
        raise AssertionError("unreachable")

    async def model_info(self, timeout: float | None = None, wait_for_ready: bool = False) -> ModelInfo:
        reply = await _model_info(self.pool, "vision", vision_pb2_grpc.VisionServiceStub,
                                  vision_pb2.GetModelInfoRequest(), timeout, wait_for_ready)
        return ModelInfo.from_pb(reply.model_info)

    async def lookup(self, keys: Sequence[str], timeout: float | None) -> list[bool]:
        if not keys:
            return []
        request = vision_pb2.LookupRequest(keys=list(keys))
        reply = await self._retrying("Lookup", lambda stub, left, metadata: stub.Lookup(
            request, timeout=left, metadata=metadata), timeout)
        if len(reply.exists) != len(keys):
            raise RuntimeError(f"vision Lookup answered {len(reply.exists)} flags for {len(keys)} keys")
        return list(reply.exists)

    async def encode(self, items: Sequence[MediaItem], max_num: int, use_thumbnail: bool,
                     timeout: float | None, route_key: str | None = None, adapter: str = "",
                     key_salt: str = "") -> list[EncodedItem]:
        """Encodes `items` with `adapter` ("" the base) under `key_salt` ("" unsalted) in one call, on the replica
        `route_key` (the first item's cache key) prefers."""
        request = vision_pb2.EncodeRequest(items=[item.to_pb() for item in items],
                                           options=PreprocessOptions(max_num, use_thumbnail).to_pb(), adapter=adapter,
                                           key_salt=key_salt)
        reply = await self._retrying("Encode", lambda stub, left, metadata: stub.Encode(
            request, timeout=left, metadata=metadata), timeout, route_key)
        if len(reply.items) != len(items):
            raise RuntimeError(f"vision Encode answered {len(reply.items)} items for {len(items)}")
        return [EncodedItem.from_pb(r) for r in reply.items]

    async def fetch(self, key: str, timeout: float | None, item: MediaItem | None = None, max_num: int = 0,
                    adapter: str = "", key_salt: str = "") -> Embeddings:
        """One cached tensor; EmbeddingsMissingError when the key is not (or no longer) cached.

        With `item` (the image `key` was encoded from, with `max_num`, `adapter` and `key_salt`), a key the cache lost is encoded
        again and its rows come back in this call, whatever the cache does meanwhile; the call then goes to the
        replica the key prefers, as its Encode would.
        """
        request = vision_pb2.FetchEmbeddingsRequest(key=key)
        if item is not None:
            request.item.CopyFrom(item.to_pb())
            request.options.CopyFrom(PreprocessOptions(max_num, True).to_pb())
            request.adapter = adapter
            request.key_salt = key_salt

        async def attempt(stub: vision_pb2_grpc.VisionServiceStub, left: float | None, metadata: Metadata):
            header, parts = None, []
            async for reply in stub.FetchEmbeddings(request, timeout=left, metadata=metadata):
                if reply.chunk.HasField("header"):
                    header = reply.chunk.header
                parts.append(reply.chunk.data)
            return header, parts

        try:
            header, parts = await self._retrying("FetchEmbeddings", attempt, timeout,
                                                 None if item is None else key)
        except NotFoundError:
            raise EmbeddingsMissingError([key]) from None
        data = b"".join(parts)
        if header is None or len(data) != header.total_bytes:
            raise RuntimeError(f"vision FetchEmbeddings of {key} returned {len(data)} bytes and no matching header")
        return Embeddings(header.dtype, tuple(header.shape), data)


# -------------------------------------------------------------------------------------------------------- llm


def embedding_messages(key: str, value: Embeddings,
                       chunk_bytes: int = INLINE_CHUNK_BYTES) -> list[llm_pb2.GenerateRequest]:
    """One image's embeddings as the EmbeddingChunk messages that follow a Generate's start."""
    return [llm_pb2.GenerateRequest(embedding=llm_pb2.EmbeddingChunk(key=key, chunk=chunk))
            for chunk in tensor_chunks(value.dtype, value.shape, value.data, chunk_bytes)]


class LLMClient:
    """Generate on the replica the conversation's prefix identity prefers, failing over before the first token."""

    def __init__(self, pool: EndpointPool, router: Router, on_retry: Callable[[str], None] | None = None):
        self.pool = pool
        self.router = router
        # Called with the method name before each retry (metrics).
        self.on_retry = on_retry

    async def close(self) -> None:
        await self.pool.close()

    async def model_info(self, timeout: float | None = None, wait_for_ready: bool = False) -> ModelInfo:
        reply = await _model_info(self.pool, "LLM", llm_pb2_grpc.LLMServiceStub, llm_pb2.GetModelInfoRequest(),
                                  timeout, wait_for_ready)
        return ModelInfo.from_pb(reply.model_info)

    async def generate(self, conversation: Conversation, sampling: SamplingParams, request_id: str,
                       inline: dict[str, Embeddings] | None, timeout: float | None,
                       priority: Priority | None = None) -> AsyncIterator[Delta | GenerateFinish]:
        """Streams `Delta`s, then one `GenerateFinish` per answer. Leaving the iteration early cancels the call.

        A replica that fails UNAVAILABLE before the first token, or stops answering health checks before it (paused,
        hung), is passed over for the key's next choice; when every ready replica has failed, the round is tried once
        more after `GENERATE_RETRY_PAUSE_S` (a Redis restart, say). Nothing was generated yet, so this is invisible
        to the caller. After a token, a failure is the caller's: a truncated answer must not pass for a complete one.
        """
        end = None if timeout is None else time.monotonic() + timeout
        key, tried, rounds = conversation.prefix_identity(), set(), 1
        while True:
            address = self.router.pick(key, tried)
            if address in tried:
                if rounds == GENERATE_ROUNDS:
                    raise self.pool.unavailable("LLM") from None
                rounds += 1
                tried.clear()
                await asyncio.sleep(GENERATE_RETRY_PAUSE_S)
                address = self.router.pick(key, tried)
            started = False
            try:
                with (_watching(self.router, address), self.pool.call(address) as endpoint,
                      outgoing(f"{LLM_SERVICE}/Generate", address) as metadata):
                    left = None if end is None else max(0.0, end - time.monotonic())
                    stream = self._generate(llm_pb2_grpc.LLMServiceStub(endpoint.channel), conversation, sampling,
                                            request_id, inline, left, metadata, priority)
                    async with contextlib.aclosing(stream):
                        first = await _first_unless_silent(stream, endpoint, functools.partial(
                            self._another_ready, address))
                        started = True
                        if self.router.breakers is not None:
                            self.router.breakers[address].succeeded()  # it answered; a later failure is a new one
                        if first is not None:
                            yield first
                            async for event in stream:
                                yield event
                return
            except NotReadyError as exc:
                if started:
                    raise
                log.info("Generate on %s failed before its first token (%s); trying the next replica", address, exc)
                self.pool.suspect(address)
                tried.add(address)
                if self.on_retry is not None:
                    self.on_retry("Generate")

    def _another_ready(self, address: str) -> bool:
        return any(a != address for a in self.pool.ready_loads())

    async def _generate(self, stub: llm_pb2_grpc.LLMServiceStub, conversation: Conversation,
                        sampling: SamplingParams, request_id: str, inline: dict[str, Embeddings] | None,
                        timeout: float | None, metadata: Metadata,
                        priority: Priority | None = None) -> AsyncIterator[Delta | GenerateFinish]:
        call = stub.Generate(timeout=timeout, metadata=metadata)
        try:
            try:
                start = GenerateRequest(conversation, sampling, inline is not None, request_id, priority).to_pb()
                await call.write(llm_pb2.GenerateRequest(start=start))
                for key, value in (inline or {}).items():
                    for message in embedding_messages(key, value):
                        await call.write(message)
                await call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                # The server ended the call while we were still writing (e.g. it rejected the request):
                # its status says why.
                pass
            finishes = []
            async for reply in call:
                kind = reply.WhichOneof("message")
                if kind == "delta":
                    yield Delta.from_pb(reply.delta)
                elif kind == "finish":
                    finishes.append(GenerateFinish.from_pb(reply.finish))
            # The finishes are passed on once the stream has closed OK, so the replica records a completed call rather
            # than one this side cancelled while its handler was still returning; so every answer's deltas come
            # before any finish.
            code = await call.code()
            if code != grpc.StatusCode.OK:
                raise grpc.aio.AioRpcError(code, await call.initial_metadata(), await call.trailing_metadata(),
                                           await call.details())
            if sorted(f.index for f in finishes) != list(range(sampling.answers)):
                raise RuntimeError(f"the LLM stream ended with finishes for answers {[f.index for f in finishes]}, "
                                   f"expected {sampling.answers}")
            for finish in sorted(finishes, key=lambda f: f.index):
                yield finish
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, "the LLM service") from None
        finally:
            call.cancel()


def _watching(router: Router, address: str) -> contextlib.AbstractContextManager[None]:
    """The verdict of one call to `address`, recorded in its circuit breaker (if the router keeps breakers)."""
    return contextlib.nullcontext() if router.breakers is None else router.breakers[address].watching()


async def _first_unless_silent(stream: AsyncIterator[T], endpoint: Endpoint, elsewhere: Callable[[], bool]) -> T | None:
    """The first event of `stream` (None: it ended with none), or NotReadyError if `endpoint` stops answering health
    checks first while `elsewhere()` says another replica is ready: nothing has been generated for the caller yet, so
    the call can go there. With nowhere else to go it keeps waiting (the caller's deadline bounds it): a replica that
    is only slow to answer its checks may still answer this call."""
    first = asyncio.ensure_future(anext(stream, None))
    try:
        while not first.done():
            if endpoint.silent.is_set():
                if elsewhere():
                    break
                await asyncio.wait({first}, timeout=SILENT_RECHECK_S)
                continue
            silent = asyncio.ensure_future(endpoint.silent.wait())
            try:
                await asyncio.wait({first, silent}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                silent.cancel()
    finally:
        if not first.done():
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError, NotReadyError):
                await first
    if first.cancelled():
        raise NotReadyError(f"the LLM replica stopped answering before its first token (no health check answer "
                            f"within {HEALTH_TIMEOUT_S:g} s); retry later")
    return first.result()


async def _model_info(pool: EndpointPool, what: str, stub_type, request, timeout: float | None,
                      wait_for_ready: bool):
    """GetModelInfo of a ready replica, or (with `wait_for_ready`) of any known one once it is reachable."""
    ready = sorted(pool.ready_loads())
    known = ready or sorted(pool.endpoints)
    if not known:
        raise pool.unavailable(what)
    try:
        return await stub_type(pool.endpoints[known[0]].channel).GetModelInfo(request, timeout=timeout,
                                                                              wait_for_ready=wait_for_ready)
    except grpc.aio.AioRpcError as exc:
        raise error_from_rpc(exc, f"the {what} service") from None


def _circuit_moved(metrics: GatewayMetrics, pool: str, address: str, state: State) -> None:
    log.warning("%s pool: replica %s circuit %s", pool, address, state.name.lower())
    metrics.observe_circuit(pool, address, state)


async def open_clients(config: GatewayConfig, metrics: GatewayMetrics,
                       health_interval_s: float = 1.0) -> tuple[VisionClient, LLMClient]:
    """Both pools discovered and watched, with their routers; close the clients to stop them."""

    def channel(target: str, host: str | None) -> grpc.aio.Channel:
        return replica_channel(target, host, config.server.max_message_bytes, config.upstream_tls)

    def router(pool: EndpointPool, what: str, policy: Policy) -> Router:
        decisions = metrics.routing_decisions
        breakers = Breakers(BreakerSettings(config.circuit_failure_threshold, config.circuit_cooldown_s),
                            on_transition=lambda address, old, new: _circuit_moved(metrics, pool.name, address, new))
        return Router(pool, what, policy, config.routing_epsilon,
                      record=lambda reason: decisions.labels(pool.name, reason.value).inc(), breakers=breakers)

    def fingerprint(stub_type, request):
        async def of(replica: grpc.aio.Channel) -> str:
            reply = await stub_type(replica).GetModelInfo(request, timeout=HEALTH_FIRST_CHECK_S)
            return ModelInfo.from_pb(reply.model_info).serving_identity

        return of

    vision_pool = EndpointPool("vision", config.vision_target, VISION_SERVICE, channel, config.resolve_interval_s,
                               health_interval_s, on_change=metrics.observe_pool,
                               fingerprint=fingerprint(vision_pb2_grpc.VisionServiceStub,
                                                       vision_pb2.GetModelInfoRequest()))
    llm_pool = EndpointPool("llm", config.llm_target, LLM_SERVICE, channel, config.resolve_interval_s,
                            health_interval_s, on_change=metrics.observe_pool,
                            fingerprint=fingerprint(llm_pb2_grpc.LLMServiceStub, llm_pb2.GetModelInfoRequest()))
    await asyncio.gather(vision_pool.start(), llm_pool.start())
    await asyncio.gather(vision_pool.wait_checked(HEALTH_FIRST_CHECK_S), llm_pool.wait_checked(HEALTH_FIRST_CHECK_S))
    vision = VisionClient(vision_pool, router(vision_pool, "vision", Policy.AFFINITY),
                          on_retry=lambda method: metrics.upstream_retries.labels("vision", method).inc(),
                          attempt_timeout_s=config.vision_attempt_timeout_s)
    return vision, LLMClient(llm_pool, router(llm_pool, "LLM", Policy(config.llm_routing)),
                             on_retry=lambda method: metrics.upstream_retries.labels("llm", method).inc())
