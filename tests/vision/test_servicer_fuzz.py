"""The vision service's gRPC API fuzzed on the wire: `Encode`, `Lookup`, `FetchEmbeddings` and `GetModelInfo` with
requests drawn from the proto descriptors (tests/helpers/proto_strategies.py), against the real servicer and service
on the tiny checkpoint, its cache in process.

Every call answers or fails with a documented status for bad input (never UNKNOWN or INTERNAL), with an ErrorDetail
and a message that shows nothing internal; afterwards the service still encodes a good image. Bounded here; `make
fuzz` runs many more (FUZZ_SCALE).
"""

from __future__ import annotations

import contextlib
import uuid

import grpc
import pytest
from helpers.background import in_background
from helpers.fuzzing import fuzz_settings, leaks, timeout_s
from helpers.media import png
from helpers.proto_strategies import INT32, MessageBytes, mostly
from hypothesis import given
from hypothesis import strategies as st
from internvl.vision.v1 import vision_pb2, vision_pb2_grpc

from services.contract.errors import ErrorCode
from services.contract.service_names import VISION_SERVICE
from services.runtime.grpc_errors import STATUS_BY_CODE, error_detail
from services.runtime.grpc_server import GrpcServer, ServerOptions
from services.vision.config import VisionConfig
from services.vision.memstore import InProcessRedis
from services.vision.metrics import VisionMetrics
from services.vision.server import VisionServicer
from services.vision.service import VisionService

pytestmark = pytest.mark.timeout(timeout_s(300))

S = grpc.StatusCode
BAD_INPUT = {S.INVALID_ARGUMENT, S.NOT_FOUND}
PNG = png(40, 30)
SERVICE = "/internvl.vision.v1.VisionService/"
DRAW = MessageBytes(values={
    "internvl.vision.v1.EncodeItem.image_bytes": st.one_of(st.binary(max_size=40), st.just(PNG), st.just(PNG[:40])),
    # At most a few tiles: the encoder's time says nothing about the checks.
    "internvl.common.v1.PreprocessOptions.max_num": mostly(st.integers(1, 2), INT32),
    "internvl.vision.v1.RawFrame.height": mostly(st.integers(1, 8), INT32),
    "internvl.vision.v1.RawFrame.width": mostly(st.integers(1, 8), INT32),
    "internvl.vision.v1.RawFrame.rgb": st.one_of(st.binary(max_size=200), st.integers(1, 8).map(lambda n: b"\x80" * 3 * n * n)),
    "internvl.vision.v1.FetchEmbeddingsRequest.max_chunk_bytes": mostly(st.integers(0, 1 << 20), INT32),
}, sizes={"internvl.vision.v1.EncodeRequest.items": st.one_of(st.integers(0, 2), st.just(65)),
          "internvl.vision.v1.LookupRequest.keys": st.one_of(st.integers(0, 4), st.just(5000))})
SEEDS = {
    "Encode": [vision_pb2.EncodeRequest(items=[vision_pb2.EncodeItem(image_bytes=PNG)]).SerializeToString()],
    "Lookup": [vision_pb2.LookupRequest(keys=["k"]).SerializeToString()],
    "FetchEmbeddings": [vision_pb2.FetchEmbeddingsRequest(key="k").SerializeToString()],
    "GetModelInfo": [b""],
}
# (method, request type, whether it streams its answers, examples)
METHODS = [("Encode", vision_pb2.EncodeRequest, False, 100), ("Lookup", vision_pb2.LookupRequest, False, 50),
           ("FetchEmbeddings", vision_pb2.FetchEmbeddingsRequest, True, 50),
           ("GetModelInfo", vision_pb2.GetModelInfoRequest, False, 10)]


@contextlib.asynccontextmanager
async def serving(checkpoint):
    config = VisionConfig(model=str(checkpoint), dtype="float32", device="cpu", max_wait_ms=1,
                          namespace=f"t{uuid.uuid4().hex[:8]}", server=ServerOptions(port=0, host="127.0.0.1"))
    metrics = VisionMetrics()
    server = GrpcServer(config.server, [VISION_SERVICE], requests=metrics.requests)
    service = await VisionService.load(config, metrics, store=InProcessRedis())
    server.add(vision_pb2_grpc.add_VisionServiceServicer_to_server, VisionServicer(service))
    port = await server.start(registry=metrics.registry)
    await server.mark_ready()
    try:
        yield f"127.0.0.1:{port}", metrics
    finally:
        await server.stop()
        await service.close()


@pytest.fixture(scope="module")
def vision(tiny_checkpoint):
    with in_background(lambda: serving(tiny_checkpoint())) as (address, metrics), \
            grpc.insecure_channel(address) as channel:
        yield channel, metrics


def encode_good(channel) -> vision_pb2.EncodeResponse:
    return vision_pb2_grpc.VisionServiceStub(channel).Encode(vision_pb2.EncodeRequest(
        items=[vision_pb2.EncodeItem(image_bytes=PNG)]), timeout=60)


@pytest.mark.parametrize(("method", "request_type", "streams", "count"), METHODS, ids=[m[0] for m in METHODS])
def test_requests_from_the_descriptor(vision, method, request_type, streams, count):
    channel, metrics = vision
    key = encode_good(channel).items[0].key
    seeds = [*SEEDS[method], vision_pb2.FetchEmbeddingsRequest(key=key).SerializeToString()] \
        if method == "FetchEmbeddings" else SEEDS[method]
    call = (channel.unary_stream if streams else channel.unary_unary)(SERVICE + method)
    requests = st.one_of(DRAW.of(request_type.DESCRIPTOR), DRAW.mutated(request_type.DESCRIPTOR, seeds))

    @fuzz_settings(count)
    @given(requests)
    def fuzz(sent):
        try:
            answer = call(sent, timeout=60)
            if streams:
                answer = list(answer)
        except grpc.RpcError as error:
            assert error.code() in BAD_INPUT, (error.code(), error.details())
            detail = error_detail(error)
            assert detail is not None and STATUS_BY_CODE[ErrorCode(detail.code)] == error.code(), error.details()
            assert not leaks(error.details() or "", sent.decode("utf-8", "replace")), error.details()

    fuzz()
    assert encode_good(channel).items[0].key == key
    assert metrics.requests.in_flight.labels(method)._value.get() == 0
