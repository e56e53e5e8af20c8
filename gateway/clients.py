"""gRPC clients of the vision and LLM services: the one place the gateway reads or builds their messages.

Channels balance calls over every address a `dns:///` target resolves to (client-side `round_robin`), so a headless
Kubernetes Service spreads the gateway's calls over all replicas instead of pinning one HTTP/2 connection to one pod.
Failed calls become domain errors (services.common.errors / gateway.errors) with the callee's caller-safe message;
a deadline is passed on every call so the caller's deadline reaches both services.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import grpc
from internvl.common.v1 import common_pb2
from internvl.llm.v1 import llm_pb2, llm_pb2_grpc
from internvl.vision.v1 import vision_pb2, vision_pb2_grpc

from gateway.backends import Embeddings, EncodedItem, EncodeItem, GenerateFinish, ModelIdentity
from gateway.conversation import Conversation, ImageRef, Part, VideoRef
from gateway.errors import DeadlineExceededError
from gateway.types import Delta, FinishReason, Sampling, TokenLogprob
from services.common.errors import (
    EmbeddingsMissingError,
    ErrorCode,
    InvalidArgumentError,
    InvalidMediaError,
    ModelMismatchError,
    NotFoundError,
    NotReadyError,
    OverloadedError,
)
from services.common.grpc_errors import error_detail
from services.common.grpc_server import DEFAULT_MAX_MESSAGE_BYTES, channel_options
from services.common.model_info import DTYPE_FROM_PB
from services.common.tensor_wire import tensor_chunks
from services.common.tls import ClientTls, secure_or_insecure_channel

log = logging.getLogger(__name__)

_FINISH = {llm_pb2.FINISH_REASON_STOP: FinishReason.STOP, llm_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
           llm_pb2.FINISH_REASON_CANCELLED: FinishReason.CANCELLED}
# Inline embeddings are sent in chunks of this size (the LLM service's gRPC limit is 16 MiB).
INLINE_CHUNK_BYTES = 1 << 20
# Attempts of an idempotent vision call failing UNAVAILABLE, and the pause before the n-th retry (n times this).
RETRY_ATTEMPTS = 3
RETRY_BACKOFF_S = 0.05
T = TypeVar("T")


def balanced_channel(target: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                     tls: ClientTls | None = None) -> grpc.aio.Channel:
    """An aio channel (TLS when `tls` is given) that round-robins calls over every address of `target`."""
    options = [*channel_options(max_message_bytes), ("grpc.lb_policy_name", "round_robin"),
               # Notice dead replicas between calls, and re-resolve DNS when scaled.
               ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000),
               ("grpc.dns_min_time_between_resolutions_ms", 5_000),
               # A restarted pool (minutes to load a large model) is used within seconds of serving again, not
               # after gRPC's default backoff of up to 120 s between reconnect attempts.
               ("grpc.initial_reconnect_backoff_ms", 500), ("grpc.max_reconnect_backoff_ms", 5_000)]
    return secure_or_insecure_channel(target, options, tls)


# ----------------------------------------------------------------------------------------------------- errors


def model_identity_from_pb(info: common_pb2.ModelInfo) -> ModelIdentity:
    return ModelIdentity(info.fingerprint, info.model_name, DTYPE_FROM_PB.get(info.dtype, ""), info.tokens_per_tile,
                         info.image_size, info.llm_hidden_size)


def translate(error: grpc.aio.AioRpcError, service: str) -> Exception:
    """The domain error for a failed call to `service`."""
    code, message = error.code(), error.details() or ""
    detail = error_detail(error)
    index = detail.item_index if detail is not None and detail.HasField("item_index") else None
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        media = detail is not None and detail.code in (ErrorCode.INVALID_MEDIA, ErrorCode.MEDIA_TOO_LARGE)
        return (InvalidMediaError if media else InvalidArgumentError)(message, item_index=index)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        if detail is not None and detail.code == ErrorCode.EMBEDDINGS_MISSING:
            return EmbeddingsMissingError(list(detail.missing_keys))
        return ModelMismatchError(f"the {service} service refused the call: {message}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return OverloadedError(f"the {service} service is overloaded, retry later: {message}")
    if code == grpc.StatusCode.UNAVAILABLE:
        return NotReadyError(f"the {service} service is unavailable, retry later")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceededError(f"the deadline passed while waiting for the {service} service")
    if code == grpc.StatusCode.CANCELLED:
        return NotReadyError(f"the {service} service cancelled the call (it may be draining), retry")
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFoundError(message)
    log.error("%s service failed: %s %s", service, code.name, message)
    return RuntimeError(f"{service} service: {code.name}")


# ----------------------------------------------------------------------------------------------------- vision


class VisionClient:
    """Lookup, Encode and FetchEmbeddings are idempotent (keys are content addresses): a call that fails UNAVAILABLE
    (a replica died, drained or lost its cache connection) is tried again, up to `RETRY_ATTEMPTS` times in all,
    within the caller's deadline; round_robin sends the new attempt to another ready replica."""

    def __init__(self, target: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 tls: ClientTls | None = None, on_retry: Callable[[str], None] | None = None):
        self.channel = balanced_channel(target, max_message_bytes, tls)
        self.stub = vision_pb2_grpc.VisionServiceStub(self.channel)
        # Called with the method name before each retry (metrics).
        self.on_retry = on_retry

    async def close(self) -> None:
        await self.channel.close()

    async def _retrying(self, method: str, call: Callable[[float | None], Awaitable[T]], timeout: float | None) -> T:
        end = None if timeout is None else time.monotonic() + timeout
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                raise DeadlineExceededError("the deadline passed while waiting for the vision service")
            try:
                return await call(left)
            except grpc.aio.AioRpcError as exc:
                error = translate(exc, "vision")
                if not isinstance(error, NotReadyError) or attempt == RETRY_ATTEMPTS:
                    raise error from None
                log.info("vision %s failed with %s (%s); trying again (attempt %d of %d)", method, exc.code().name,
                         exc.details(), attempt + 1, RETRY_ATTEMPTS)
            if self.on_retry is not None:
                self.on_retry(method)
            await asyncio.sleep(RETRY_BACKOFF_S * attempt)
        raise AssertionError("unreachable")

    async def model_info(self, timeout: float | None = None, wait_for_ready: bool = False) -> ModelIdentity:
        try:
            reply = await self.stub.GetModelInfo(vision_pb2.GetModelInfoRequest(), timeout=timeout,
                                                 wait_for_ready=wait_for_ready)
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, "vision") from None
        return model_identity_from_pb(reply.model_info)

    async def lookup(self, keys: Sequence[str], timeout: float | None) -> list[bool]:
        if not keys:
            return []
        request = vision_pb2.LookupRequest(keys=list(keys))
        reply = await self._retrying("Lookup", lambda left: self.stub.Lookup(request, timeout=left), timeout)
        if len(reply.exists) != len(keys):
            raise RuntimeError(f"vision Lookup answered {len(reply.exists)} flags for {len(keys)} keys")
        return list(reply.exists)

    async def encode(self, items: Sequence[EncodeItem], max_num: int, use_thumbnail: bool,
                     timeout: float | None) -> list[EncodedItem]:
        request = vision_pb2.EncodeRequest(
            items=[vision_pb2.EncodeItem(image_bytes=i.data) if i.kind == "image" else
                   vision_pb2.EncodeItem(frame=vision_pb2.RawFrame(rgb=i.data, height=i.height, width=i.width))
                   for i in items],
            options=common_pb2.PreprocessOptions(max_num=max_num, use_thumbnail=use_thumbnail))
        reply = await self._retrying("Encode", lambda left: self.stub.Encode(request, timeout=left), timeout)
        if len(reply.items) != len(items):
            raise RuntimeError(f"vision Encode answered {len(reply.items)} items for {len(items)}")
        return [EncodedItem(r.key, r.num_tiles, r.cache_hit) for r in reply.items]

    async def fetch(self, key: str, timeout: float | None) -> Embeddings:
        """One cached tensor; EmbeddingsMissingError when the key is not (or no longer) cached."""

        async def attempt(left: float | None):
            header, parts = None, []
            async for reply in self.stub.FetchEmbeddings(vision_pb2.FetchEmbeddingsRequest(key=key), timeout=left):
                if reply.chunk.HasField("header"):
                    header = reply.chunk.header
                parts.append(reply.chunk.data)
            return header, parts

        try:
            header, parts = await self._retrying("FetchEmbeddings", attempt, timeout)
        except NotFoundError:
            raise EmbeddingsMissingError([key]) from None
        data = b"".join(parts)
        if header is None or len(data) != header.total_bytes:
            raise RuntimeError(f"vision FetchEmbeddings of {key} returned {len(data)} bytes and no matching header")
        return Embeddings(header.dtype, tuple(header.shape), data)


# -------------------------------------------------------------------------------------------------------- llm


def _ref_pb(ref: ImageRef) -> llm_pb2.ImageRef:
    return llm_pb2.ImageRef(key=ref.key, num_tiles=ref.num_tiles)


def _part_pb(part: Part) -> llm_pb2.ContentPart:
    if isinstance(part, str):
        return llm_pb2.ContentPart(text=part)
    if isinstance(part, ImageRef):
        return llm_pb2.ContentPart(image=_ref_pb(part))
    assert isinstance(part, VideoRef)
    return llm_pb2.ContentPart(video=llm_pb2.VideoRef(frames=[_ref_pb(f) for f in part.frames]))


def generate_start(conversation: Conversation, sampling: Sampling, request_id: str,
                   inline: bool) -> llm_pb2.GenerateStart:
    start = llm_pb2.GenerateStart(
        history=[llm_pb2.Turn(user_parts=[_part_pb(p) for p in t.user_parts], assistant_text=t.assistant_text)
                 for t in conversation.history],
        user_parts=[_part_pb(p) for p in conversation.user_parts],
        sampling=llm_pb2.SamplingParams(
            max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k, repetition_penalty=sampling.repetition_penalty,
            stop_strings=list(sampling.stop_strings), seed=sampling.seed, top_logprobs=sampling.top_logprobs),
        inline_embeddings=inline, request_id=request_id)
    if conversation.system_message is not None:
        start.system_message = conversation.system_message
    return start


def _embedding_messages(key: str, value: Embeddings) -> list[llm_pb2.GenerateRequest]:
    return [llm_pb2.GenerateRequest(embedding=llm_pb2.EmbeddingChunk(key=key, chunk=chunk))
            for chunk in tensor_chunks(value.dtype, value.shape, value.data, INLINE_CHUNK_BYTES)]


def _delta(message: llm_pb2.TokenDelta) -> Delta:
    logprobs = tuple(
        TokenLogprob(token_id, top.logprob, tuple(zip(top.token_ids, top.logprobs, strict=False)))
        for token_id, top in zip(message.token_ids, message.top_logprobs, strict=False))
    return Delta(message.text, tuple(message.token_ids), logprobs)


class LLMClient:
    def __init__(self, target: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 tls: ClientTls | None = None):
        self.channel = balanced_channel(target, max_message_bytes, tls)
        self.stub = llm_pb2_grpc.LLMServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def model_info(self, timeout: float | None = None, wait_for_ready: bool = False) -> ModelIdentity:
        try:
            reply = await self.stub.GetModelInfo(llm_pb2.GetModelInfoRequest(), timeout=timeout,
                                                 wait_for_ready=wait_for_ready)
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, "LLM") from None
        return model_identity_from_pb(reply.model_info)

    async def generate(self, conversation: Conversation, sampling: Sampling, request_id: str,
                       inline: dict[str, Embeddings] | None, timeout: float | None
                       ) -> AsyncIterator[Delta | GenerateFinish]:
        """Streams `Delta`s, then one `GenerateFinish`. Leaving the iteration early cancels the call."""
        call = self.stub.Generate(timeout=timeout)
        try:
            try:
                await call.write(llm_pb2.GenerateRequest(start=generate_start(
                    conversation, sampling, request_id, inline is not None)))
                for key, value in (inline or {}).items():
                    for message in _embedding_messages(key, value):
                        await call.write(message)
                await call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                # The server ended the call while we were still writing (e.g. it rejected the request):
                # its status says why.
                pass
            async for reply in call:
                kind = reply.WhichOneof("message")
                if kind == "delta":
                    yield _delta(reply.delta)
                elif kind == "finish":
                    usage = reply.finish.usage
                    yield GenerateFinish(_FINISH.get(reply.finish.reason, FinishReason.STOP), usage.prompt_tokens,
                                         usage.completion_tokens, usage.cached_prompt_tokens)
                    return
            code = await call.code()
            if code != grpc.StatusCode.OK:
                raise grpc.aio.AioRpcError(code, await call.initial_metadata(), await call.trailing_metadata(),
                                           await call.details())
            raise RuntimeError("the LLM stream ended without a finish message")
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, "LLM") from None
        finally:
            call.cancel()
