"""The gRPC servicer in-process on port 0: translation, chunked FetchEmbeddings, status codes, health, metrics."""

from __future__ import annotations

import uuid

import grpc
import pytest
import pytest_asyncio
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.media import png
from internvl.common.v1 import common_pb2
from internvl.vision.v1 import vision_pb2, vision_pb2_grpc

from services.contract.cache_keys import cache_key, model_identity
from services.contract.service_names import VISION_SERVICE
from services.runtime.embedding_store import encode_value
from services.runtime.grpc_errors import error_detail
from services.runtime.grpc_server import GrpcServer, ServerOptions
from services.vision.config import VisionConfig
from services.vision.memstore import InProcessRedis
from services.vision.metrics import VisionMetrics
from services.vision.server import VisionServicer
from services.vision.service import VisionService


@pytest_asyncio.fixture
async def stack(tiny_checkpoint):
    """(server, servicer, stub, health stub, service-to-attach, store): the model loaded but not attached yet."""
    metrics = VisionMetrics()
    config = VisionConfig(model=str(tiny_checkpoint()), dtype="float32", device="cpu", max_wait_ms=1,
                          namespace=f"t{uuid.uuid4().hex[:8]}", server=ServerOptions(port=0, host="127.0.0.1"))
    server = GrpcServer(config.server, [VISION_SERVICE], requests=metrics.requests)
    servicer = VisionServicer()
    server.add(vision_pb2_grpc.add_VisionServiceServicer_to_server, servicer)
    port = await server.start(registry=metrics.registry)
    store = InProcessRedis()
    service = await VisionService.load(config, metrics, store=store)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield (server, servicer, vision_pb2_grpc.VisionServiceStub(channel), health_pb2_grpc.HealthStub(channel),
               service, store)
    finally:
        await channel.close()
        await server.stop()
        await service.close()


async def _ready(stack):
    server, servicer, stub, _, service, store = stack
    await service.warm_up()
    servicer.service = service
    await server.mark_ready()
    return stub, service, store


@pytest.mark.asyncio
async def test_unavailable_and_not_ready_until_the_model_is_attached(stack):
    _, _, stub, health, _, _ = stack
    status = await health.Check(health_pb2.HealthCheckRequest(service=VISION_SERVICE))
    assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetModelInfo(vision_pb2.GetModelInfoRequest())
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    await _ready(stack)
    status = await health.Check(health_pb2.HealthCheckRequest(service=VISION_SERVICE))
    assert status.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.asyncio
async def test_model_info(stack):
    stub, service, _ = await _ready(stack)
    info = (await stub.GetModelInfo(vision_pb2.GetModelInfoRequest())).model_info
    assert info.fingerprint == service.checkpoint.fingerprint
    assert (info.llm_hidden_size, info.tokens_per_tile, info.image_size) == (64, 256, 448)
    assert info.dtype == common_pb2.DTYPE_FLOAT32
    assert (info.llm_architecture, info.vision_architecture) == ("Qwen2ForCausalLM", "InternVisionModel")


@pytest.mark.asyncio
async def test_encode_lookup_and_chunked_fetch(stack):
    stub, service, _ = await _ready(stack)
    data = png(900, 450)
    reply = await stub.Encode(vision_pb2.EncodeRequest(
        items=[vision_pb2.EncodeItem(image_bytes=data),
               vision_pb2.EncodeItem(frame=vision_pb2.RawFrame(rgb=b"\x80" * 12, height=2, width=2))],
        options=common_pb2.PreprocessOptions(max_num=2)))
    image, frame = reply.items
    assert (image.num_tiles, image.num_tokens, image.cache_hit) == (3, 768, False)
    assert (frame.num_tiles, frame.num_tokens) == (1, 256)
    lookup = await stub.Lookup(vision_pb2.LookupRequest(keys=[image.key, image.key[:-1] + "x", frame.key]))
    assert list(lookup.exists) == [True, False, True]

    chunks = [r.chunk async for r in stub.FetchEmbeddings(
        vision_pb2.FetchEmbeddingsRequest(key=image.key, max_chunk_bytes=50_000))]
    assert chunks[0].HasField("header") and not any(c.HasField("header") for c in chunks[1:])
    header = chunks[0].header
    assert (list(header.shape), header.dtype, header.total_bytes) == ([768, 64], common_pb2.DTYPE_FLOAT32,
                                                                      768 * 64 * 4)
    assert all(len(c.data) <= 50_000 for c in chunks) and len(chunks) == -(-header.total_bytes // 50_000)
    offsets = [c.offset for c in chunks]
    assert offsets == [sum(len(c.data) for c in chunks[:i]) for i in range(len(chunks))]
    fetched = torch.frombuffer(bytearray(b"".join(c.data for c in chunks)), dtype=torch.float32).reshape(768, 64)
    assert torch.equal(fetched, (await service.fetch(image.key)).to_tensor())

    # Given the image, a key the cache lost comes back all the same (encoded again), in the same chunks.
    await service.store.delete(image.key)
    again = [r.chunk async for r in stub.FetchEmbeddings(vision_pb2.FetchEmbeddingsRequest(
        key=image.key, max_chunk_bytes=50_000, item=vision_pb2.EncodeItem(image_bytes=data),
        options=common_pb2.PreprocessOptions(max_num=2)))]
    assert again == chunks


@pytest.mark.asyncio
async def test_fetch_errors(stack):
    stub, service, store = await _ready(stack)
    absent = cache_key(model_identity(service.checkpoint.fingerprint, "float32"), 12, True, 448, b"never",
                       "image", namespace=service.config.namespace)

    async def fetch_error(request):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.FetchEmbeddings(request):
                pass
        return info.value

    missing = await fetch_error(vision_pb2.FetchEmbeddingsRequest(key=absent))
    assert missing.code() == grpc.StatusCode.NOT_FOUND and absent in missing.details()
    bad_size = await fetch_error(vision_pb2.FetchEmbeddingsRequest(key=absent, max_chunk_bytes=100))
    assert bad_size.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_chunk_bytes" in bad_size.details()
    foreign = await fetch_error(vision_pb2.FetchEmbeddingsRequest(key="session:1234"))
    assert foreign.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A corrupt value is as good as absent (and is dropped from the cache).
    await store.set(absent, encode_value(torch.ones(256, 64), service.checkpoint.fingerprint)[:-1])
    corrupt = await fetch_error(vision_pb2.FetchEmbeddingsRequest(key=absent))
    assert corrupt.code() == grpc.StatusCode.NOT_FOUND and not await store.exists(absent)


@pytest.mark.asyncio
async def test_bad_input_status_detail_and_request_metrics(stack):
    stub, service, _ = await _ready(stack)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Encode(vision_pb2.EncodeRequest(items=[vision_pb2.EncodeItem(image_bytes=png(8, 8)),
                                                          vision_pb2.EncodeItem()]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("items[1]: ")
    detail = error_detail(info.value)
    assert detail.item_index == 1 and detail.code == common_pb2.ERROR_CODE_INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Encode(vision_pb2.EncodeRequest(items=[vision_pb2.EncodeItem(image_bytes=b"\xff\xd8 nope")]))
    assert error_detail(info.value).code == common_pb2.ERROR_CODE_INVALID_MEDIA
    await stub.Encode(vision_pb2.EncodeRequest(items=[vision_pb2.EncodeItem(image_bytes=png(8, 8))]))

    registry = service.metrics.registry

    def count(code: str) -> float | None:
        return registry.get_sample_value("internvl_vision_requests_total", {"method": "Encode", "code": code})

    assert (count("INVALID_ARGUMENT"), count("OK")) == (2.0, 1.0)
    assert registry.get_sample_value("internvl_vision_cache_misses_total") == 1.0
