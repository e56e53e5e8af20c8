"""Fake vision and LLM services behind a real gateway (gRPC, and HTTP with `fake_http_gateway`), for the gateway's tests.

The fakes are real gRPC servers (the project's GrpcServer, so errors travel through the same interceptor and
ErrorDetail trailers as in production) whose servicers keep a dict as the "shared cache" and record every call.
They let the orchestration be tested without a model: keys, Lookup-before-Encode, fan-out, retries on eviction,
deadlines and cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import struct
from dataclasses import dataclass, field

import grpc
from aiohttp import web
from internvl.common.v1 import common_pb2
from internvl.gateway.v1 import gateway_pb2_grpc
from internvl.llm.v1 import llm_pb2, llm_pb2_grpc
from internvl.vision.v1 import vision_pb2, vision_pb2_grpc
from PIL import Image

from gateway.clients import open_clients
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.openai.app import create_app
from gateway.orchestrator import Orchestrator
from gateway.server import ChatServicer
from gateway.sessions import MemorySessionStore
from services.contract.cache_keys import cache_key, frame_media, model_identity
from services.contract.errors import (
    EmbeddingsMissingError,
    InvalidArgumentError,
    InvalidMediaError,
    NotFoundError,
)
from services.contract.service_names import GATEWAY_SERVICE, LLM_SERVICE, VISION_SERVICE
from services.contract.tiling import count_tiles
from services.runtime.grpc_server import GrpcServer, ServerOptions
from services.runtime.request_metrics import RequestMetrics

FINGERPRINT = "feedfacefeedface"
TOKENS_PER_TILE = 256
HIDDEN = 4  # float32: 4 KiB per tile keeps inline transfers small


# --------------------------------------------------------------------------------------------------- fakes


@dataclass
class FakeCache:
    """The "shared cache": key -> tiles. Both fakes read it, as both real services read Redis."""

    tiles: dict[str, int] = field(default_factory=dict)


class FakeVision(vision_pb2_grpc.VisionServiceServicer):
    def __init__(self, cache: FakeCache, fingerprint: str = FINGERPRINT):
        self.cache = cache
        self.fingerprint = fingerprint
        self.calls: list[tuple[str, int]] = []
        self.time_remaining: list[float | None] = []
        # Raised by the next Encode, when set.
        self.fail_encode: Exception | None = None

    async def Encode(self, request, context):
        self.calls.append(("Encode", len(request.items)))
        self.time_remaining.append(context.time_remaining())
        if self.fail_encode is not None:
            error, self.fail_encode = self.fail_encode, None
            raise error
        out = []
        for i, item in enumerate(request.items):
            key, tiles = self._key_and_tiles(i, item, request.options)
            hit = key in self.cache.tiles
            self.cache.tiles[key] = tiles
            out.append(vision_pb2.EncodedItem(key=key, num_tiles=tiles, num_tokens=tiles * TOKENS_PER_TILE,
                                              cache_hit=hit))
        return vision_pb2.EncodeResponse(items=out)

    def _key_and_tiles(self, i: int, item: vision_pb2.EncodeItem, options) -> tuple[str, int]:
        max_num, thumb = options.max_num, options.use_thumbnail
        if item.WhichOneof("media") == "image_bytes":
            if item.image_bytes.startswith(b"\x89PNG") and b"BROKEN" in item.image_bytes:
                raise InvalidMediaError(f"items[{i}]: cannot decode image: broken", item_index=i)
            width, height = Image.open(io.BytesIO(item.image_bytes)).size
            media, kind = item.image_bytes, "image"
        else:
            frame = item.frame
            width, height = frame.width, frame.height
            media, kind = frame_media(frame.rgb, frame.height, frame.width), "frame"
        key = cache_key(model_identity(self.fingerprint, "float32"), max_num, thumb, 448, media, kind)
        return key, count_tiles(width, height, max_num, 448, thumb)

    async def Lookup(self, request, context):
        self.calls.append(("Lookup", len(request.keys)))
        return vision_pb2.LookupResponse(exists=[k in self.cache.tiles for k in request.keys])

    async def FetchEmbeddings(self, request, context):
        """With `item`, a key the cache lacks is "encoded" again (and stored), as the real service does."""
        self.calls.append(("FetchEmbeddings", 1))
        tiles = self.cache.tiles.get(request.key)
        if tiles is None and request.HasField("item"):
            key, tiles = self._key_and_tiles(0, request.item, request.options)
            if key != request.key:
                raise InvalidArgumentError(f"key {request.key} is not the item's key {key}")
            self.cache.tiles[key] = tiles
        if tiles is None:
            raise NotFoundError(f"no embeddings under {request.key}")
        data = embedding_bytes(request.key, tiles)
        header = common_pb2.TensorHeader(dtype=common_pb2.DTYPE_FLOAT32, total_bytes=len(data),
                                         shape=[tiles * TOKENS_PER_TILE, HIDDEN])
        half = len(data) // 2
        yield vision_pb2.FetchEmbeddingsResponse(chunk=common_pb2.TensorChunk(header=header, offset=0,
                                                                              data=data[:half]))
        yield vision_pb2.FetchEmbeddingsResponse(chunk=common_pb2.TensorChunk(offset=half, data=data[half:]))

    async def GetModelInfo(self, request, context):
        return vision_pb2.GetModelInfoResponse(model_info=model_info(self.fingerprint))


def embedding_bytes(key: str, tiles: int) -> bytes:
    """Deterministic stand-in embeddings of `key`: float32 [tiles*256, HIDDEN]."""
    seed = sum(key.encode()) % 1000
    return b"".join(struct.pack("<f", float(seed + i)) for i in range(tiles * TOKENS_PER_TILE * HIDDEN))


def model_info(fingerprint: str) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(fingerprint=fingerprint, model_name="fake", llm_hidden_size=HIDDEN,
                                dtype=common_pb2.DTYPE_FLOAT32, tokens_per_tile=TOKENS_PER_TILE, image_size=448)


class FakeLLM(llm_pb2_grpc.LLMServiceServicer):
    """Answers "a b c" (token ids 1 2 3); reads referenced keys not sent inline from the fake cache like the real
    service."""

    def __init__(self, cache: FakeCache, fingerprint: str = FINGERPRINT):
        self.cache = cache
        self.fingerprint = fingerprint
        self.starts: list[llm_pb2.GenerateStart] = []
        self.inline: list[dict[str, bytes]] = []
        self.time_remaining: list[float | None] = []
        # Called with the start message before the cache is read (e.g. to evict keys).
        self.before_read = None
        self.block = False
        self.blocked = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def Generate(self, request_iterator, context):
        first = await anext(aiter(request_iterator))
        start = first.start
        self.starts.append(start)
        self.time_remaining.append(context.time_remaining())
        inline: dict[str, bytearray] = {}
        async for message in request_iterator:
            inline.setdefault(message.embedding.key, bytearray()).extend(message.embedding.chunk.data)
        self.inline.append({k: bytes(v) for k, v in inline.items()})
        if self.before_read is not None:
            self.before_read(start)
        refs = [p.image for t in [*start.history, start] for p in t.user_parts if p.HasField("image")]
        refs += [f for t in [*start.history, start] for p in t.user_parts if p.HasField("video")
                 for f in p.video.frames]
        missing = list(dict.fromkeys(r.key for r in refs if r.key not in inline and r.key not in self.cache.tiles))
        if missing:
            raise EmbeddingsMissingError(missing)
        if self.block:
            self.blocked.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        # Answer i of n (interleaved, as the real service streams them) ends with " <i>" after the first.
        answers = max(start.sampling.n, 1)
        for token_id, text in ((1, "a"), (2, " b"), (3, " c")):
            for index in range(answers):
                top = [llm_pb2.TopLogprobs(logprob=-0.5, token_ids=[token_id, 9], logprobs=[-0.5, -1.5])]
                yield llm_pb2.GenerateResponse(delta=llm_pb2.TokenDelta(
                    text=text + (f" {index}" if index and token_id == 3 else ""), token_ids=[token_id],
                    top_logprobs=top if start.sampling.top_logprobs else [], index=index))
        for index in reversed(range(answers)):
            yield llm_pb2.GenerateResponse(finish=llm_pb2.GenerateFinish(
                reason=common_pb2.FINISH_REASON_STOP, index=index,
                usage=common_pb2.Usage(prompt_tokens=100, completion_tokens=3,
                                    cached_prompt_tokens=10 * len(start.history))))

    async def GetModelInfo(self, request, context):
        return llm_pb2.GetModelInfoResponse(model_info=model_info(self.fingerprint))


@dataclass
class FakeStack:
    cache: FakeCache
    visions: list[FakeVision]
    llm: FakeLLM
    orchestrator: Orchestrator
    metrics: GatewayMetrics
    config: GatewayConfig
    channel: grpc.aio.Channel
    stub: gateway_pb2_grpc.ChatServiceStub
    # The gateway's host:port.
    address: str
    # The fake services' servers: vision replicas first, the LLM last.
    servers: list = field(default_factory=list)

    def vision_calls(self, method: str) -> list[int]:
        return [n for v in self.visions for m, n in v.calls if m == method]


async def _serve(register, servicer, name: str, requests: RequestMetrics | None = None) -> GrpcServer:
    server = GrpcServer(ServerOptions(port=0, host="127.0.0.1", drain_seconds=0.5), [name],
                        requests=requests if requests is not None else RequestMetrics("fake_"))
    server.add(register, servicer)
    await server.start()
    await server.mark_ready()
    return server


@contextlib.asynccontextmanager
async def fake_stack(media_root=None, vision_replicas: int = 2, llm_fingerprint: str = FINGERPRINT,
                     connect: bool = True, **config):
    """Fake vision replicas and a fake LLM on free ports, and a real gateway (gRPC) in front of them."""
    cache = FakeCache()
    visions = [FakeVision(cache) for _ in range(vision_replicas)]
    llm = FakeLLM(cache, llm_fingerprint)
    servers = [await _serve(vision_pb2_grpc.add_VisionServiceServicer_to_server, v, VISION_SERVICE)
               for v in visions]
    servers.append(await _serve(llm_pb2_grpc.add_LLMServiceServicer_to_server, llm, LLM_SERVICE))
    cfg = GatewayConfig(vision_target="ipv4:" + ",".join(f"127.0.0.1:{s.port}" for s in servers[:-1]),
                        llm_target=f"ipv4:127.0.0.1:{servers[-1].port}", media_root=media_root,
                        server=ServerOptions(port=0, host="127.0.0.1", drain_seconds=0.5), **config)
    metrics = GatewayMetrics()
    vision_client, llm_client = await open_clients(cfg, metrics, health_interval_s=0.2)
    orchestrator = Orchestrator(cfg, vision_client, llm_client, MemorySessionStore(cfg.session_ttl_s), metrics)
    gateway = await _serve(gateway_pb2_grpc.add_ChatServiceServicer_to_server, ChatServicer(orchestrator, metrics),
                           GATEWAY_SERVICE, metrics.requests)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
    try:
        if connect:
            await orchestrator.connect(timeout=10)
        yield FakeStack(cache, visions, llm, orchestrator, metrics, cfg, channel,
                        gateway_pb2_grpc.ChatServiceStub(channel), f"127.0.0.1:{gateway.port}", servers)
    finally:
        await channel.close()
        for server in (gateway, *servers):
            await server.stop()
        await orchestrator.close()
        await vision_client.close()
        await llm_client.close()


@dataclass
class FakeHTTPGateway:
    """A fake stack whose gateway also serves the OpenAI-compatible HTTP API at `url`."""

    stack: FakeStack
    url: str  # http://127.0.0.1:PORT


@contextlib.asynccontextmanager
async def fake_http_gateway(**stack_args):
    """`fake_stack(**stack_args)` and the gateway's HTTP app on a free port, served as the gateway serves it."""
    async with fake_stack(**stack_args) as stack:
        runner = web.AppRunner(create_app(stack.orchestrator, stack.metrics, lambda: True), access_log=None,
                               handler_cancellation=True)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            yield FakeHTTPGateway(stack, f"http://127.0.0.1:{runner.addresses[0][1]}")
        finally:
            await runner.cleanup()
