"""The LLM service depends on the engine interface only: a fake engine, built by the engine factory from the config,
drives the service and its gRPC servicer; the service refuses a model it does not serve and a full queue before any
work; and service.py imports no concrete engine."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import threading
from pathlib import Path

import grpc
import pytest
import torch
from helpers.llm_wire import embedding_messages, serving, start_message
from internvl.common.v1 import common_pb2
from internvl.llm.v1 import llm_pb2

from services.contract.constraint import Constraint, ConstraintKind
from services.contract.conversation import Conversation, GenerateRequest, ImageRef
from services.contract.errors import ContextTooLongError, InvalidArgumentError, NotFoundError, OverloadedError
from services.contract.finish import FinishReason, Usage
from services.contract.sampling import SamplingLimits, SamplingParams
from services.llm import service as service_module
from services.llm.config import LLMConfig
from services.llm.engine import factory
from services.llm.engine.api import Engine, EngineLoad, GenerationStream
from services.llm.engine.events import EngineRequest, Finish, TokenDelta
from services.llm.metrics import LLMMetrics
from services.llm.service import LLMService

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]


class FakeEngine(Engine):
    """Answers every request with the token 42 (text "x") then a LENGTH finish; remembers what it was given."""

    dtype = torch.bfloat16

    def __init__(self):
        self.requests: list[EngineRequest] = []
        self.cancelled = 0
        self.refuse = False
        self.waiting = 0  # what load() reports as waiting
        self.started = self.closed = False

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

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
        return EngineLoad(running=len(self.requests), waiting=self.waiting, kv_bytes=0, kv_reserved_bytes=0,
                          kv_budget_bytes=1)


@pytest.fixture
def make_fake_service(reference, monkeypatch):
    """make_fake_service(**LLMConfig fields) -> (service, fake engine): the factory builds the engine registered as
    "fake", which the config names."""
    chat = reference("qwen2")

    def make(**overrides):
        fake, given = FakeEngine(), []

        def build(inputs: factory.EngineInputs) -> Engine:
            given.append(inputs)
            return fake

        monkeypatch.setitem(factory.ENGINES, "fake", build)
        config = LLMConfig(model=str(chat.checkpoint.path), engine="fake", **overrides)
        service = LLMService(config, chat.checkpoint, chat.tokenizer, LLMMetrics())
        [inputs] = given
        assert inputs.config is config and inputs.prompts is service.prompts and inputs.model is None
        assert inputs.max_context_tokens == service.max_context_tokens
        return service, fake

    return make


@pytest.fixture
def fake_service(make_fake_service):
    return make_fake_service(max_new_tokens_default=77)


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
    assert responses[1].finish.reason == common_pb2.FINISH_REASON_LENGTH
    # What the engine was given: the prompt the service built, the server's default length, the embeddings.
    [request] = fake.requests
    expected = service.prompts.build(Conversation(user_parts=(ImageRef("small", 1), "Describe.")))
    assert request.prompt.token_ids == expected.token_ids
    assert request.prompt.image_keys == ["small"]
    assert request.max_new_tokens == 77
    assert (request.sampling.temperature, request.sampling.seed) == (0.5, 3)
    assert len(request.image_rows) == 1 and torch.equal(request.image_rows[0], rows)
    assert info.model_info.dtype == common_pb2.DTYPE_BFLOAT16
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def hi(**sampling) -> GenerateRequest:
    return GenerateRequest(Conversation(user_parts=("Hi",)), SamplingParams(**sampling))


async def test_a_model_not_served_and_a_full_queue_are_refused_before_any_work(make_fake_service, monkeypatch):
    service, fake = make_fake_service(max_queue=3)
    work = []
    monkeypatch.setattr(service.prompts, "build", lambda conversation: work.append("tokenise"))

    async def compile_grammar(constraint):
        work.append("compile")

    monkeypatch.setattr(service.grammar_pool, "compile", compile_grammar)
    constrained = hi(constraint=Constraint(ConstraintKind.CHOICE, choices=("yes", "no")))
    with pytest.raises(NotFoundError, match=r"^model 'nope' is not served by this LLM server \(adapters: none\)$"):
        unknown = dataclasses.replace(constrained.conversation, adapter="nope")
        await service.generate(GenerateRequest(unknown, constrained.sampling))
    fake.waiting = 3
    with pytest.raises(OverloadedError, match=r"^the LLM server's queue is full \(3 waiting requests\)$"):
        await service.generate(constrained)
    assert work == [] and fake.requests == []


async def test_the_request_limits_are_refused_before_the_engine_gets_anything(make_fake_service, monkeypatch):
    """The LLM service's own limits (it has callers other than the gateway): sampling limits before tokenising,
    --max-prompt-tokens and a max_new_tokens that does not fit beside the prompt before any compile or prefill; an
    unset max_new_tokens is --max-new-tokens-default cut to the room the context leaves."""
    service, fake = make_fake_service(max_context_tokens=200, max_prompt_tokens=60, max_new_tokens_default=500,
                                      sampling_limits=SamplingLimits(max_n=2, max_stop_strings=1))
    work = []
    build = service.prompts.build

    def recorded(conversation):
        work.append("tokenise")
        return build(conversation)

    async def compile_grammar(constraint):
        work.append("compile")

    monkeypatch.setattr(service.prompts, "build", recorded)
    monkeypatch.setattr(service.grammar_pool, "compile", compile_grammar)
    with pytest.raises(InvalidArgumentError, match=r"^n must be between 1 and 2 \(--max-n\), got 3$"):
        await service.generate(hi(n=3))
    with pytest.raises(InvalidArgumentError, match=r"^at most 1 stop strings \(--max-stop-strings\), got 2$"):
        await service.generate(hi(stop_strings=("a", "b")))
    assert work == []
    choice = Constraint(ConstraintKind.CHOICE, choices=("yes", "no"))
    long = GenerateRequest(Conversation(user_parts=("word " * 80,)), SamplingParams(constraint=choice))
    with pytest.raises(ContextTooLongError, match=r"^the prompt has \d+ tokens \(images included\); at most 60 "
                                                  r"\(--max-prompt-tokens\)$"):
        await service.generate(long)
    with pytest.raises(InvalidArgumentError, match=r"^max_new_tokens 1000000000 does not fit: the prompt has (\d+) "
                                                   r"tokens and the context 200 \(--max-context-tokens\), so at most "
                                                   r"\d+ can be generated$"):
        await service.generate(hi(max_new_tokens=10**9, constraint=choice))
    assert work == ["tokenise", "tokenise"] and fake.requests == []
    await service.generate(hi())
    [taken] = fake.requests
    assert taken.max_new_tokens == 200 - len(taken.prompt)


async def test_requests_being_prepared_hold_their_place_in_the_queue(make_fake_service, monkeypatch):
    """Two requests whose prompts are being built fill a queue of two: a third is refused at once, though the engine
    has nothing waiting; both are then handed to the engine."""
    service, fake = make_fake_service(max_queue=2)
    building, release = threading.Semaphore(0), threading.Event()
    build = service.prompts.build

    def slow_build(conversation):
        building.release()
        release.wait(30)
        return build(conversation)

    monkeypatch.setattr(service.prompts, "build", slow_build)
    first = asyncio.create_task(service.generate(hi()))
    await asyncio.to_thread(building.acquire, True, 30)
    second = asyncio.create_task(service.generate(hi()))  # waits behind the first in the one tokenisation thread
    while service.intake.preparing < 2:
        await asyncio.sleep(0.001)
    with pytest.raises(OverloadedError, match="queue is full"):
        await service.generate(hi())
    release.set()
    await asyncio.wait_for(asyncio.gather(first, second), 30)
    assert len(fake.requests) == 2 and service.intake.preparing == 0


async def test_an_engine_name_the_factory_does_not_know_is_refused(reference):
    chat = reference("qwen2")
    config = LLMConfig(model=str(chat.checkpoint.path), engine="nope")
    with pytest.raises(InvalidArgumentError, match=r"engine 'nope' is not one of this server's engines \(.*transformers"):
        LLMService(config, chat.checkpoint, chat.tokenizer)


async def test_the_service_imports_no_concrete_engine():
    """From services.llm.engine, service.py imports the interface and the factory only."""
    tree = ast.parse(Path(service_module.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    engine = {name for name in imported if name.startswith("services.llm.engine")}
    assert engine == {"services.llm.engine.api", "services.llm.engine.events", "services.llm.engine.factory"}
