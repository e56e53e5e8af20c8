"""Fuzzing the layers that read untrusted input, in process, with hypothesis: the public request parsing (the gRPC
`ChatRequest.from_pb` and the OpenAI-compatible request models, with the sampling and option checks that follow
them) and the media decoding (data: URLs, media-root paths, the image header probe and decoder, the video decoder).

Each may succeed or raise a domain error (`InternVLError`, which the servers turn into a specific status with a
caller-safe message); any other exception would reach a caller as INTERNAL, so it fails the test. Bounded: ~100-200
examples per target, no deadline, a few seconds each (`make fuzz`: many more).
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from helpers import media
from helpers.fuzzing import fuzz_settings, timeout_s
from hypothesis import given
from hypothesis import strategies as st
from internvl.gateway.v1 import gateway_pb2 as G
from PIL import Image

from gateway.chat_request import ChatRequest
from gateway.media import MediaResolver, decode_data_url, decode_video, probe_image
from gateway.openai.protocol import parse
from gateway.planning import check_max_num
from gateway.sessions import check_session_id
from services.contract.errors import InternVLError
from services.contract.tiling import MAX_NUM_LIMIT
from services.vision.preprocess import open_image

pytestmark = [pytest.mark.timeout(timeout_s(300)),
              # Pillow warns about what it skips in a damaged TIFF; that is the decoder coping, not a failure.
              pytest.mark.filterwarnings("ignore::UserWarning")]

# Bounded here; `make fuzz` multiplies the examples (helpers.fuzzing).
FUZZ = fuzz_settings(150)
SMALL = fuzz_settings(100)


def domain_or_success(fn, *args) -> None:
    """Calls fn; only success or an InternVLError may come out."""
    try:
        fn(*args)
    except InternVLError:
        pass


# ------------------------------------------------------------------------------------------------- requests


def checked_request(request: ChatRequest) -> None:
    """What the gateway checks on a parsed request before any media is read."""
    request.sampling.validate()
    check_max_num(request.max_num, "max_num", MAX_NUM_LIMIT)
    for part in request.content:
        if part.video is not None:
            check_max_num(part.video.max_num, "video", MAX_NUM_LIMIT)
    if request.session_id is not None:
        check_session_id(request.session_id)


json_scalars = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | \
    st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20)
urls = st.one_of(st.text(max_size=60), st.sampled_from(["data:image/png;base64,", "data:,x", "http://x/y.png",
                                                         "/etc/passwd", "../up.png", "file:///etc/hosts",
                                                         "data:image/png;base64,iVBORw0KGgo="]))
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": json_values}),
    st.fixed_dictionaries({"type": st.just("image_url"),
                           "image_url": st.one_of(json_values, st.fixed_dictionaries({"url": urls | json_values}))}),
    st.fixed_dictionaries({"type": st.just("video"), "video": st.one_of(json_values, st.fixed_dictionaries(
        {}, optional={"url": urls, "path": urls | json_values, "num_segments": json_values,
                      "bound": json_values, "max_num": json_values}))}),
    json_values,
)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "developer", "tool", 3])},
    optional={"content": st.one_of(st.text(max_size=30), st.lists(parts, max_size=3), json_values)}),
    max_size=4)
bodies = st.one_of(json_values, st.fixed_dictionaries(
    {"messages": messages},
    optional={name: json_values for name in (
        "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed",
        "logprobs", "top_logprobs", "stream", "stream_options", "n", "max_num", "session_id", "multi_image_mode",
        "user", "model")}))


@FUZZ
@given(bodies)
def test_openai_request_parsing_raises_only_domain_errors(body):
    try:
        request = parse(body).chat_request()
    except InternVLError:
        return
    domain_or_success(checked_request, request)


int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
uint64 = st.integers(min_value=0, max_value=2**64 - 1)
floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


@st.composite
def content_parts(draw) -> G.ContentPart:
    kind = draw(st.sampled_from(["text", "image", "video", "none"]))
    if kind == "text":
        return G.ContentPart(text=draw(st.text(max_size=40)))
    if kind == "none":
        return G.ContentPart()
    source = draw(st.sampled_from(["data", "path", "url", None] if kind == "image" else ["data", "path", None]))
    value = {"data": st.binary(max_size=64), "path": st.text(max_size=30), "url": urls, None: st.none()}[source]
    fields = {source: draw(value)} if source else {}
    if kind == "image":
        return G.ContentPart(image=G.ImageInput(**fields))
    video = G.VideoInput(**fields)
    if draw(st.booleans()):
        video.num_segments = draw(int32)
    if draw(st.booleans()):
        video.max_num = draw(int32)
    if draw(st.booleans()):
        video.bound.start_s, video.bound.end_s = draw(floats32), draw(floats32)
    return G.ContentPart(video=video)


@st.composite
def chat_requests(draw) -> G.ChatRequest:
    request = G.ChatRequest(
        content=draw(st.lists(content_parts(), max_size=4)),
        history=[G.Turn(user_content=draw(st.lists(content_parts(), max_size=2)), assistant_text=draw(st.text()))
                 for _ in range(draw(st.integers(0, 2)))],
        sampling=G.SamplingParams(max_new_tokens=draw(int32), temperature=draw(floats32), top_p=draw(floats32),
                                  top_k=draw(int32), repetition_penalty=draw(floats32),
                                  stop_strings=draw(st.lists(st.text(max_size=5), max_size=20)),
                                  top_logprobs=draw(int32)),
        multi_image_mode=draw(st.integers(0, 5)), request_id=draw(st.text(max_size=10)))
    if draw(st.booleans()):
        request.sampling.seed = draw(uint64)
    if draw(st.booleans()):
        request.max_num = draw(int32)
    if draw(st.booleans()):
        request.session_id = draw(st.text(max_size=140))
    if draw(st.booleans()):
        request.system_message = draw(st.text(max_size=20))
    return request


@FUZZ
@given(chat_requests())
def test_grpc_request_parsing_raises_only_domain_errors(message):
    # Through the wire format and back, as the server receives it.
    message = G.ChatRequest.FromString(message.SerializeToString())
    try:
        request = ChatRequest.from_pb(message)
    except InternVLError:
        return
    domain_or_success(checked_request, request)


@SMALL
@given(st.binary(max_size=300))
def test_grpc_request_from_arbitrary_bytes(data):
    from google.protobuf.message import DecodeError

    try:
        message = G.ChatRequest.FromString(data)
    except DecodeError:  # refused by the transport's deserializer, before any handler
        return
    try:
        request = ChatRequest.from_pb(message)
    except InternVLError:
        return
    domain_or_success(checked_request, request)


# ---------------------------------------------------------------------------------------------------- media


@FUZZ
@given(st.one_of(st.text(max_size=200), st.builds(lambda h, p: f"data:{h},{p}", st.text(max_size=30),
                                                    st.text(max_size=80))))
def test_data_url_parser(url):
    domain_or_success(decode_data_url, url, "url", 1 << 20)


@pytest.fixture(scope="module")
def resolver(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-root")
    (root / "ok.png").write_bytes(media.noise_png())
    (root / "sub").mkdir()
    os.symlink("/etc/hostname", root / "sub" / "out")
    return MediaResolver(root, 1 << 20, 1_000_000, 8)


@FUZZ
@given(st.one_of(st.text(max_size=60), st.sampled_from(["ok.png", "sub/out", "../../etc/passwd", "/etc/passwd",
                                                        "sub/../ok.png", "file:///etc/hosts", "", "\x00", ".",
                                                        "sub", "sub/../../x"])))
def test_media_root_paths(resolver, path):
    try:
        data = resolver.read_path(path, "p")
    except InternVLError:
        return
    assert data == (resolver.media_root / "ok.png").read_bytes()  # the one readable file inside the root


def _seeds() -> list[bytes]:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8))
    return [media.encoded(image, fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM")]


IMAGE_SEEDS = _seeds()


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """A valid file with a few bytes flipped, a piece cut out or the end truncated; or plain noise."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=400))
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        start = draw(st.integers(0, len(data)))
        del data[start:start + draw(st.integers(0, 64))]
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


@fuzz_settings(200)
@given(mutated(IMAGE_SEEDS))
def test_image_probe_and_decoder(data):
    domain_or_success(probe_image, data, 1_000_000, "image")
    domain_or_success(open_image, data, 1_000_000)


VIDEO_SEEDS = [media.write_video(frames=6, fps=4, size=(32, 24)),
               media.write_video(frames=4, fps=4, size=(32, 24), fmt="avi", seed=1),
               media.write_video(frames=4, fps=4, size=(32, 24), fmt="matroska", seed=2)]


@SMALL
@given(mutated(VIDEO_SEEDS), st.integers(1, 6), st.one_of(st.none(), st.tuples(st.floats(-5, 5), st.floats(-5, 5))))
def test_video_decoder(data, num_segments, bound):
    domain_or_success(decode_video, data, num_segments, bound, 1_000_000, "video")


def test_seeds_decode():
    """The fuzzers start from valid files (else they would only test the error paths)."""
    for data in IMAGE_SEEDS:
        assert probe_image(data, 1_000_000, "i") == (32, 24)
        assert open_image(data).size == (32, 24)
    for data in VIDEO_SEEDS:
        assert len(decode_video(data, 2, None, 1_000_000, "v")) == 2
    Image.open(io.BytesIO(IMAGE_SEEDS[0])).verify()
