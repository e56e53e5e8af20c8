"""The LLM service's gRPC API fuzzed on the wire: `Generate` streams (a start, then any messages, embedding chunks
among them) and `GetModelInfo`, with messages drawn from the proto descriptors (tests/helpers/proto_strategies.py),
against the real servicer and service on the tiny checkpoint (Qwen2, a 384-token context: one tile and a short answer).

Every call answers or fails with a documented status for bad input (never UNKNOWN or INTERNAL), with an ErrorDetail
and a message that shows nothing internal; afterwards the service still answers a good request and holds no
sequence. Bounded here; `make fuzz` runs many more (FUZZ_SCALE).
"""

from __future__ import annotations

import contextlib

import grpc
import pytest
import torch
from helpers.background import in_background
from helpers.fuzzing import fuzz_settings, leaks, timeout_s
from helpers.llm_wire import embedding_messages, start_message
from helpers.proto_strategies import INT32, SAMPLING_VALUES, MessageBytes, mostly
from hypothesis import given
from hypothesis import strategies as st
from internvl.llm.v1 import llm_pb2, llm_pb2_grpc

from services.contract.errors import ErrorCode
from services.contract.service_names import LLM_SERVICE
from services.llm.server import LLMServicer
from services.runtime.grpc_errors import STATUS_BY_CODE, error_detail
from services.runtime.grpc_server import GrpcServer, ServerOptions, channel_options

pytestmark = pytest.mark.timeout(timeout_s(300))

S = grpc.StatusCode
# Bad input, an adapter not served, images neither inline nor cached, more KV memory than the budget.
BAD_INPUT = {S.INVALID_ARGUMENT, S.NOT_FOUND, S.FAILED_PRECONDITION, S.RESOURCE_EXHAUSTED}
GENERATE = "/internvl.llm.v1.LLMService/Generate"
DRAW = MessageBytes(values={
    **SAMPLING_VALUES,
    "internvl.llm.v1.ImageRef.num_tiles": mostly(st.integers(0, 2), INT32),
    "internvl.llm.v1.ImageRef.key": st.sampled_from(["img", "other", ""]),
    "internvl.llm.v1.EmbeddingChunk.key": st.sampled_from(["img", "other", ""]),
    "internvl.common.v1.TensorChunk.offset": mostly(st.integers(0, 4096), st.integers(-(2**63), 2**63 - 1)),
}, sizes={"internvl.llm.v1.GenerateStart.history": st.integers(0, 2),
          "internvl.common.v1.TensorHeader.shape": st.integers(0, 3)})


def seeds(hidden: int) -> list[list[bytes]]:
    """Valid Generate streams: text alone, and an image whose embeddings come inline."""
    image = llm_pb2.ContentPart(image=llm_pb2.ImageRef(key="img", num_tiles=1))
    inline = [start_message(image, llm_pb2.ContentPart(text="Describe."), inline=True, max_new_tokens=3),
              *embedding_messages("img", torch.zeros(256, hidden))]
    text = [start_message(llm_pb2.ContentPart(text="Hi"), max_new_tokens=3, temperature=0.5, seed=1, top_logprobs=2)]
    return [[m.SerializeToString() for m in stream] for stream in (text, inline)]


@contextlib.asynccontextmanager
async def serving(make_service):
    async with make_service(max_context_tokens=384) as service:
        server = GrpcServer(ServerOptions(port=0, host="127.0.0.1"), [LLM_SERVICE], requests=service.metrics.requests)
        server.add(llm_pb2_grpc.add_LLMServiceServicer_to_server, LLMServicer(service))
        port = await server.start()
        await server.mark_ready()
        try:
            yield f"127.0.0.1:{port}", service
        finally:
            await server.stop()


@pytest.fixture(scope="module")
def llm(make_service):
    with in_background(lambda: serving(make_service)) as (address, service), \
            grpc.insecure_channel(address, options=channel_options()) as channel:
        yield channel, service


def streams(hidden: int) -> st.SearchStrategy[list[bytes]]:
    """A start (drawn whole, or a seed's changed), then 0-2 messages of any kind; or a seed with one message
    changed."""
    valid = seeds(hidden)
    starts = st.one_of(DRAW.of(llm_pb2.GenerateRequest.DESCRIPTOR),
                       DRAW.mutated(llm_pb2.GenerateRequest.DESCRIPTOR, [stream[0] for stream in valid]))
    rest = st.lists(DRAW.of(llm_pb2.GenerateRequest.DESCRIPTOR), max_size=2)
    drawn = st.builds(lambda first, more: [first, *more], starts, rest)

    @st.composite
    def one_changed(draw) -> list[bytes]:
        stream = list(draw(st.sampled_from(valid)))
        index = draw(st.integers(0, len(stream) - 1))
        stream[index] = draw(DRAW.mutated(llm_pb2.GenerateRequest.DESCRIPTOR, [stream[index]]))
        return stream

    return st.one_of(drawn, one_changed())


def check_failure(error: grpc.RpcError, sent: list[bytes]) -> None:
    assert error.code() in BAD_INPUT, (error.code(), error.details())
    detail = error_detail(error)
    assert detail is not None and STATUS_BY_CODE[ErrorCode(detail.code)] == error.code(), error.details()
    assert not leaks(error.details() or "", b"".join(sent).decode("utf-8", "replace")), error.details()


def test_generate_streams_from_the_descriptor(llm):
    channel, service = llm
    call = channel.stream_stream(GENERATE)  # bytes in, bytes out
    valid = seeds(service.hidden_size)
    for stream in valid:  # the fuzzing starts from requests that are answered
        assert len(list(call(iter(stream), timeout=60))) > 1

    @fuzz_settings(60)
    @given(streams(service.hidden_size))
    def fuzz(sent):
        try:
            list(call(iter(sent), timeout=60))
        except grpc.RpcError as error:
            check_failure(error, sent)

    fuzz()
    assert len(list(call(iter(valid[1]), timeout=60))) > 1
    assert service.engine.load().running == 0


def test_model_info_from_the_descriptor(llm):
    channel, _ = llm
    call = channel.unary_unary("/internvl.llm.v1.LLMService/GetModelInfo")

    @fuzz_settings(10)
    @given(DRAW.of(llm_pb2.GetModelInfoRequest.DESCRIPTOR))
    def fuzz(sent):
        assert llm_pb2.GetModelInfoResponse.FromString(call(sent, timeout=30)).model_info.fingerprint

    fuzz()
