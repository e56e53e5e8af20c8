"""The LLMService servicer in process on port 0: inline embeddings, client cancellation, statuses of failures."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.llm_wire import embedding_messages, serving, start_message
from internvl.common.v1 import common_pb2
from internvl.llm.v1 import llm_pb2, llm_pb2_grpc

from services.contract.service_names import LLM_SERVICE
from services.llm.server import LLMServicer, ReadinessFollower
from services.runtime.embedding_store import EmbeddingCache
from services.runtime.grpc_errors import error_detail
from services.runtime.grpc_server import GrpcServer, ServerOptions
from services.runtime.request_metrics import RequestMetrics
from services.vision.memstore import InProcessRedis

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]


async def tokens_of(call) -> list[int]:
    ids = []
    async for response in call:
        ids += response.delta.token_ids
    return ids


@pytest.fixture(scope="module")
def wide(reference, pixels, embeddings_of):
    return embeddings_of(reference("qwen2"), pixels["wide"])


async def test_inline_embeddings_equal_the_reference(make_service, reference, pixels, wide):
    chat = reference("qwen2")
    from services.model.chat import GenerationParams

    _, prompt = chat.build_prompt("Describe.", None, [3])
    expected = chat.generate_ids(prompt, pixels["wide"], GenerationParams(max_new_tokens=6))
    part = llm_pb2.ContentPart(image=llm_pb2.ImageRef(key="wide", num_tiles=3))
    # bfloat16 on the wire is allowed too; here float32, in 64 KiB chunks (the 3 tiles are 192 KiB).
    chunks = embedding_messages("wide", wide, chunk_bytes=64 * 1024)
    assert len(chunks) == 3
    async with make_service() as service, serving(service) as stub:
        ids = await tokens_of(stub.Generate(iter([start_message(part, llm_pb2.ContentPart(text="Describe."),
                                                                inline=True), *chunks])))
    assert ids == expected


@pytest.mark.parametrize("mutate", ["no-chunks", "wrong-shape", "gap", "no-header", "extra-key"])
async def test_bad_inline_embeddings_are_invalid_argument(make_service, wide, mutate):
    part = llm_pb2.ContentPart(image=llm_pb2.ImageRef(key="wide", num_tiles=3))
    chunks = embedding_messages("wide", wide, chunk_bytes=64 * 1024)
    if mutate == "no-chunks":
        chunks = []
    elif mutate == "wrong-shape":
        chunks = embedding_messages("wide", wide[:256])
    elif mutate == "gap":
        del chunks[1]
    elif mutate == "no-header":
        chunks[0].embedding.chunk.ClearField("header")
    elif mutate == "extra-key":
        chunks += embedding_messages("other", torch.zeros(256, wide.shape[1]))
    async with make_service() as service, serving(service) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await tokens_of(stub.Generate(iter([start_message(part, inline=True), *chunks])))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_inline_keys_win_and_the_others_are_read_from_the_cache(make_service, reference, pixels,
                                                                     embeddings_of, wide):
    """Some images inline (those the cache lost), the rest from the cache: the same answer as all inline; a key
    neither sent nor cached is FAILED_PRECONDITION naming only that key."""
    small = embeddings_of(reference("qwen2"), pixels["small"])
    parts = [llm_pb2.ContentPart(image=llm_pb2.ImageRef(key="wide", num_tiles=3)),
             llm_pb2.ContentPart(image=llm_pb2.ImageRef(key="small", num_tiles=1)),
             llm_pb2.ContentPart(text="Compare them.")]
    async with make_service() as service, serving(service) as stub:
        everything = await tokens_of(stub.Generate(iter([start_message(*parts, inline=True),
                                                         *embedding_messages("wide", wide),
                                                         *embedding_messages("small", small)])))
        service.embedding_cache = EmbeddingCache(InProcessRedis(), service.checkpoint.fingerprint)
        await service.embedding_cache.put("small", small)
        mixed = await tokens_of(stub.Generate(iter([start_message(*parts, inline=True),
                                                    *embedding_messages("wide", wide)])))
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await tokens_of(stub.Generate(iter([start_message(*parts)])))
    assert mixed == everything and everything
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert list(error_detail(failure.value).missing_keys) == ["wide"]


async def test_first_message_must_be_start(make_service, wide):
    async with make_service() as service, serving(service) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await tokens_of(stub.Generate(iter(embedding_messages("wide", wide))))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_images_without_a_cache_or_inline_are_rejected(make_service):
    part = llm_pb2.ContentPart(image=llm_pb2.ImageRef(key="k", num_tiles=1))
    async with make_service() as service, serving(service) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await tokens_of(stub.Generate(iter([start_message(part)])))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inline" in failure.value.details()


async def test_client_cancel_frees_the_slot_while_others_go_on(make_service):
    async with make_service() as service, serving(service) as stub:
        calls = [stub.Generate(iter([start_message(llm_pb2.ContentPart(text=f"Go {i}"), max_new_tokens=40)]))
                 for i in range(3)]
        received = [0, 0, 0]

        async def consume(i):
            async for response in calls[i]:
                received[i] += len(response.delta.token_ids)
            return (await calls[i].code())

        tasks = [asyncio.create_task(consume(i)) for i in range(3)]
        for _ in range(2000):
            if service.engine.load().running == 3 and min(received) >= 2:
                break
            await asyncio.sleep(0.005)
        calls[1].cancel()
        for _ in range(2000):
            if service.engine.load().running == 2:
                break
            await asyncio.sleep(0.005)
        assert service.engine.load().running == 2
        assert service.metrics.running._value.get() == 2
        codes = await asyncio.gather(*tasks, return_exceptions=True)
    assert codes[0] == codes[2] == grpc.StatusCode.OK
    assert received[0] == received[2] == 40
    assert received[1] < 40


async def test_full_queue_is_resource_exhausted(make_service):
    async with make_service(max_batch_size=1, max_queue=1) as service, serving(service) as stub:
        long = stub.Generate(iter([start_message(llm_pb2.ContentPart(text="Long."), max_new_tokens=400)]))
        await long.read()
        waiting = stub.Generate(iter([start_message(llm_pb2.ContentPart(text="Next."), max_new_tokens=1)]))
        for _ in range(2000):
            if service.engine.load().waiting == 1:
                break
            await asyncio.sleep(0.005)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await tokens_of(stub.Generate(iter([start_message(llm_pb2.ContentPart(text="Third."))])))
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_detail(failure.value).code == common_pb2.ERROR_CODE_OVERLOADED
        long.cancel()
        assert len(await tokens_of(waiting)) == 1


async def test_not_ready_until_loaded():
    server = GrpcServer(ServerOptions(port=0, host="127.0.0.1"), [LLM_SERVICE], requests=RequestMetrics("llm_"))
    server.add(llm_pb2_grpc.add_LLMServiceServicer_to_server, LLMServicer(None))
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await llm_pb2_grpc.LLMServiceStub(channel).GetModelInfo(llm_pb2.GetModelInfoRequest())
    finally:
        await server.server.stop(0)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_readiness_follows_the_engines_in_order_and_stops_with_the_drain():
    """An engine that restarts after a fault tells its readiness (services.llm.engine.api `Engine.readiness`): the
    server's grpc.health.v1 readiness follows every change in order, liveness stays SERVING, and once a drain began
    nothing makes it SERVING again."""
    server = GrpcServer(ServerOptions(port=0, host="127.0.0.1"), [LLM_SERVICE], requests=RequestMetrics("llm_"))
    port = await server.start()
    await server.mark_ready()
    follow = ReadinessFollower(server)
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def status(name: str = LLM_SERVICE):
                return (await health.Check(health_pb2.HealthCheckRequest(service=name))).status

            for ready in (False, True, False, False, True, False):
                follow(ready)
            await follow.settled()
            assert (await status(), await status("")) == (not_serving, serving)
            follow(True)
            await follow.settled()
            assert await status() == serving
            await server.health.enter_graceful_shutdown()
            follow(True)
            await follow.settled()
            assert await status() == not_serving
    finally:
        await server.server.stop(0)
