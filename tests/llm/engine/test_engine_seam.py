"""The LLM service depends on the engine interface only: a fake engine drives the service and its gRPC servicer."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from helpers.llm_wire import embedding_messages, serving, start_message
from internvl.common.v1 import common_pb2
from internvl.llm.v1 import llm_pb2

from services.contract.errors import OverloadedError
from services.contract.finish import FinishReason
from services.llm.config import LLMConfig
from services.llm.engine.api import Engine, EngineLoad, GenerationStream
from services.llm.engine.events import EngineRequest, Finish, TokenDelta, Usage
from services.llm.metrics import LLMMetrics
from services.llm.prompt import Conversation, ImagePart, TextPart
from services.llm.service import LLMService

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]


class FakeEngine(Engine):
    """Answers every request with the token 42 (text "x") then a LENGTH finish; remembers what it was given."""

    dtype = torch.bfloat16

    def __init__(self):
        self.requests: list[EngineRequest] = []
        self.cancelled = 0
        self.refuse = False
        self.started = self.closed = False

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    @property
    def queue_full(self) -> bool:
        return False

    def submit(self, request: EngineRequest) -> GenerationStream:
        if self.refuse:
            raise OverloadedError("fake engine: no room")
        self.requests.append(request)
        queue: asyncio.Queue = asyncio.Queue()
        queue.put_nowait(TokenDelta((42,), "x"))
        queue.put_nowait(Finish(FinishReason.LENGTH, Usage(len(request.prompt), 1, 0)))
        return GenerationStream(queue, self._cancel)

    def _cancel(self) -> None:
        self.cancelled += 1

    def load(self) -> EngineLoad:
        return EngineLoad(running=len(self.requests), waiting=0, kv_bytes=0, kv_reserved_bytes=0, kv_budget_bytes=1)


@pytest.fixture
def fake_service(reference):
    chat = reference("qwen2")
    fake = FakeEngine()
    config = LLMConfig(model=str(chat.checkpoint.path), max_new_tokens_default=77)
    service = LLMService(config, chat.checkpoint, chat.tokenizer, lambda prompts, context: fake, LLMMetrics())
    return service, fake


async def test_a_fake_engine_drives_the_service_and_servicer(fake_service, reference, pixels, embeddings_of):
    service, fake = fake_service
    chat = reference("qwen2")
    rows = embeddings_of(chat, pixels["small"])
    await service.start()
    assert fake.started and service.engine.observer is service.metrics
    try:
        async with serving(service) as stub:
            part = llm_pb2.ContentPart(image=llm_pb2.ImageRef(key="small", num_tiles=1))
            call = stub.Generate(iter([start_message(part, llm_pb2.ContentPart(text="Describe."), inline=True,
                                                     max_new_tokens=0, temperature=0.5, seed=3),
                                       *embedding_messages("small", rows)]))
            responses = [r async for r in call]
            info = await stub.GetModelInfo(llm_pb2.GetModelInfoRequest())
            fake.refuse = True
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                [r async for r in stub.Generate(iter([start_message(llm_pb2.ContentPart(text="Hi"))]))]
    finally:
        await service.close()
    assert fake.closed and fake.cancelled >= 1  # the servicer frees the slot when its stream ends
    assert [r.WhichOneof("message") for r in responses] == ["delta", "finish"]
    assert list(responses[0].delta.token_ids) == [42] and responses[0].delta.text == "x"
    assert responses[1].finish.reason == llm_pb2.FINISH_REASON_LENGTH
    # What the engine was given: the prompt the service built, the server's default length, the embeddings.
    [request] = fake.requests
    expected = service.prompts.build(Conversation(user_parts=(ImagePart("small", 1), TextPart("Describe."))))
    assert request.prompt.token_ids == expected.token_ids
    assert request.prompt.image_keys == ["small"]
    assert request.max_new_tokens == 77
    assert (request.sampling.temperature, request.sampling.seed) == (0.5, 3)
    assert len(request.image_rows) == 1 and torch.equal(request.image_rows[0], rows)
    assert info.model_info.dtype == common_pb2.DTYPE_BFLOAT16
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
