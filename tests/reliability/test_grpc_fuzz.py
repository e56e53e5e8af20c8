"""The public gRPC API fuzzed on the wire: `internvl.gateway.v1.ChatService` `Chat` and `BatchChat` with requests drawn
from the proto descriptors (tests/helpers/proto_strategies.py: any field value, oneofs, repeated sizes, unknown
enum numbers, strings with NULs, huge or not UTF-8 at all, nested media garbage), sent to a real gateway with fake
services behind it (tests/helpers/fakes.py) and a media root holding one picture.

Every call either answers or fails with one of the documented statuses for bad input, never UNKNOWN, and INTERNAL
only where the test injected a fault into a fake service; every failure carries an ErrorDetail whose code maps to
the call's status, and its message shows nothing of the server's insides. Afterwards the gateway still answers a
good request, with nothing left in flight.

Bounded here (400 calls, a few seconds); `make fuzz` runs many more (FUZZ_SCALE).
"""

from __future__ import annotations

import grpc
import pytest
from helpers.background import in_background
from helpers.chat import chat, image_part, text_part
from helpers.fakes import fake_stack
from helpers.fuzzing import fuzz_settings, leaks, timeout_s
from helpers.media import png
from helpers.proto_strategies import SAMPLING_VALUES, MessageBytes
from hypothesis import given
from hypothesis import strategies as st
from internvl.gateway.v1 import gateway_pb2 as G
from internvl.gateway.v1 import gateway_pb2_grpc

from services.contract.errors import ErrorCode
from services.runtime.grpc_errors import STATUS_BY_CODE, error_detail

pytestmark = pytest.mark.timeout(timeout_s(300))

S = grpc.StatusCode
# What bad input may get (README: What each status means to a caller); none of these is retried by a caller as is.
BAD_INPUT = {S.INVALID_ARGUMENT, S.PERMISSION_DENIED, S.NOT_FOUND, S.FAILED_PRECONDITION, S.ABORTED,
             S.RESOURCE_EXHAUSTED}
PNG = png(64, 48)
# Media a part may carry: mostly garbage, sometimes the real picture or the one file under the media root.
MEDIA = st.one_of(st.binary(max_size=40), st.just(PNG), st.just(PNG[:30]))
PATHS = st.sampled_from(["ok.png", "../ok.png", "/etc/passwd", "", "ok.png\x00x", "sub/../ok.png", "."])
DRAW = MessageBytes(values={
    **SAMPLING_VALUES,
    "internvl.gateway.v1.ImageInput.data": MEDIA,
    "internvl.gateway.v1.VideoInput.data": MEDIA,
    "internvl.gateway.v1.ImageInput.path": PATHS,
    "internvl.gateway.v1.VideoInput.path": PATHS,
    "internvl.gateway.v1.ImageInput.url": st.sampled_from(["data:image/png;base64,", "http://example.com/a.png",
                                                           "data:,x", "file:///etc/hosts", "data:image/png;base64,%%"]),
}, sizes={"internvl.gateway.v1.BatchChatRequest.requests": st.one_of(st.integers(0, 3), st.just(65)),
          "internvl.gateway.v1.ChatRequest.history": st.integers(0, 2),
          "internvl.gateway.v1.Turn.user_content": st.integers(0, 2)})

def _seeds() -> list[G.ChatRequest]:
    """Valid requests (each answered by the fakes) for the fuzzing to change a field or two of."""
    sampling = G.SamplingParams(max_new_tokens=4, temperature=0.7, top_k=5, seed=3, top_logprobs=2)
    return [
        G.ChatRequest(content=[text_part("Hi")]),
        G.ChatRequest(content=[image_part(path="ok.png"), text_part("What is it?")], max_num=6, sampling=sampling),
        G.ChatRequest(content=[image_part(PNG), image_part(path="ok.png"), text_part("Compare.")],
                      multi_image_mode=G.MULTI_IMAGE_MODE_COMBINED, system_message="Be brief."),
        G.ChatRequest(content=[text_part("And then?")], history=[G.Turn(user_content=[text_part("Hi")],
                                                                        assistant_text="Hello.")],
                      sampling=G.SamplingParams(n=2, max_new_tokens=3), model="fake"),
    ]


CHATS = [seed.SerializeToString() for seed in _seeds()]
BATCHES = [G.BatchChatRequest(requests=_seeds()[:2]).SerializeToString()]
# (service method, request type, valid requests, whether it streams its answers)
METHODS = [("/internvl.gateway.v1.ChatService/Chat", G.ChatRequest, CHATS, True),
           ("/internvl.gateway.v1.ChatService/BatchChat", G.BatchChatRequest, BATCHES, False)]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-media")
    (root / "ok.png").write_bytes(PNG)
    with in_background(lambda: fake_stack(media_root=root)) as stack, grpc.insecure_channel(stack.address) as channel:
        yield stack, channel


def inject(stack, fault: str | None) -> None:
    """A fake service failing as a bug would (a RuntimeError whose text must not reach the caller), or none."""
    error = RuntimeError("boom in /work/secret at 127.0.0.1")
    for vision in stack.visions:
        vision.fail_encode = error if fault == "vision" else None

    def fail(start):
        raise error

    stack.llm.before_read = fail if fault == "llm" else None


def check_failure(error: grpc.RpcError, sent: bytes, fault: str | None) -> None:
    allowed = BAD_INPUT | ({S.INTERNAL} if fault else set())
    assert error.code() in allowed, (error.code(), error.details())
    detail = error_detail(error)
    assert detail is not None, (error.code(), error.details())
    assert STATUS_BY_CODE[ErrorCode(detail.code)] == error.code(), (detail, error.code())
    message = error.details() or ""
    assert not leaks(message, sent.decode("utf-8", "replace")), message
    if error.code() == S.INTERNAL:  # BatchChat names the question: "requests[2]: internal error"
        assert message == "internal error" or (message.startswith("requests[") and message.endswith("]: internal error"))


def assert_still_serving(stack, channel) -> None:
    inject(stack, None)
    answer = chat(gateway_pb2_grpc.ChatServiceStub(channel), [image_part(path="ok.png"), text_part("What is it?")])
    assert answer.text == "a b c" and answer.finish is not None
    assert stack.metrics.requests.in_flight.labels("Chat")._value.get() == 0
    assert stack.metrics.requests.in_flight.labels("BatchChat")._value.get() == 0


def test_the_seeds_are_answered(gateway):
    stack, channel = gateway
    inject(stack, None)
    for seed in _seeds():
        assert chat(gateway_pb2_grpc.ChatServiceStub(channel), seed.content, **{
            field.name: value for field, value in seed.ListFields() if field.name != "content"}).finish is not None
    assert len(gateway_pb2_grpc.ChatServiceStub(channel).BatchChat(G.BatchChatRequest.FromString(BATCHES[0]))
               .results) == 2


@pytest.mark.parametrize(("method", "request_type", "seeds", "streams"), METHODS,
                         ids=[m[0].rsplit("/", 1)[1] for m in METHODS])
def test_requests_from_the_descriptor(gateway, method, request_type, seeds, streams):
    stack, channel = gateway
    call = (channel.unary_stream if streams else channel.unary_unary)(method)  # bytes in, bytes out
    requests = st.one_of(DRAW.of(request_type.DESCRIPTOR), DRAW.mutated(request_type.DESCRIPTOR, seeds))

    @fuzz_settings(200)
    @given(requests, st.sampled_from([None, None, None, "vision", "llm"]))
    def fuzz(sent, fault):
        inject(stack, fault)
        try:
            answer = call(sent, timeout=30)
            if streams:
                answer = list(answer)
        except grpc.RpcError as error:
            check_failure(error, sent, fault)

    fuzz()
    assert_still_serving(stack, channel)


def test_an_injected_fault_is_internal_with_a_detail(gateway):
    """The fuzzing can tell INTERNAL apart (else allowing it under a fault would hide nothing)."""
    stack, channel = gateway
    inject(stack, "llm")
    with pytest.raises(grpc.RpcError) as info:
        chat(gateway_pb2_grpc.ChatServiceStub(channel), [text_part("Hi")])
    assert info.value.code() == S.INTERNAL and info.value.details() == "internal error"
    assert error_detail(info.value).code == ErrorCode.INTERNAL
    assert_still_serving(stack, channel)
