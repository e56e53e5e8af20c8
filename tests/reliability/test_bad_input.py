"""Bad input through the real gateway, table-driven: each case gets its specific status and a message naming what is
wrong and what to do, the message leaks nothing internal (no traceback, source path or internal address), and every
server still answers a good request right after.

The stack is the package's (conftest): a 4 MiB gRPC message limit, 3 MB of media per part, a 4096-token context.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from helpers import media
from helpers.chat import assert_no_leak, chat, image_part, text_part, video_part
from internvl.common.v1 import common_pb2
from internvl.gateway.v1 import gateway_pb2 as G
from PIL import Image

from reliability.limits import MAX_CONTEXT_TOKENS, MAX_MEDIA_BYTES, MAX_MESSAGE_BYTES
from services.runtime.grpc_errors import error_detail

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

INVALID, DENIED, NOT_FOUND, EXHAUSTED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
                                         grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED)


@dataclass
class Case:
    id: str
    # (stack) -> ChatRequest fields; `content` is a list of parts.
    build: Any
    code: grpc.StatusCode
    message: str  # a regex the message must match (re.search)


def sampling(**fields) -> dict:
    return {"content": [text_part("Hi")], "sampling": G.SamplingParams(**fields)}


def _symlink_out(stack) -> dict:
    link = stack.media_root / "escape.png"
    with contextlib.suppress(FileExistsError):
        os.symlink("/etc/hostname", link)
    return {"content": [G.ContentPart(image=G.ImageInput(path="escape.png")), text_part("?")]}


def _expired_session(stack) -> dict:
    first = chat(stack.stub, [text_part("Remember me.")])
    key = f"{stack.namespace}:session:v1:{first.finish.session_id}"
    with contextlib.closing(stack.redis.client()) as client:
        assert client.pexpire(key, 1)
    time.sleep(0.05)
    return {"content": [text_part("Still there?")], "session_id": first.finish.session_id}


CASES = [
    # -- image bytes
    Case("empty-image", lambda s: {"content": [image_part(b""), text_part("?")]}, INVALID, r"content\[0\] \(image\): "
         r"the media is empty"),
    Case("non-image-bytes", lambda s: {"content": [image_part(b"hello, I am not a picture" * 4), text_part("?")]},
         INVALID, r"content\[0\] \(image\): cannot decode the image: not a supported image format \(send PNG"),
    Case("unsupported-format-ico", lambda s: {"content": [
        image_part(media.encoded(Image.new("RGB", (32, 32)), "ICO")), text_part("?")]},
         INVALID, r"not a supported image format \(send PNG, JPEG"),
    Case("unsupported-format-pdf", lambda s: {"content": [image_part(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n"),
                                                          text_part("?")]},
         INVALID, r"not a supported image format"),
    Case("corrupt-png", lambda s: {"content": [image_part(media.corrupt_png(1)), text_part("?")]},
         INVALID, r"content\[0\] \(image\): cannot decode image"),
    Case("truncated-png", lambda s: {"content": [image_part(media.noise_png(200, 150, 2)[:3000]), text_part("?")]},
         INVALID, r"content\[0\] \(image\): cannot decode image \(truncated or corrupt data\)"),
    Case("decompression-bomb", lambda s: {"content": [image_part(media.bomb_png()), text_part("?")]},
         INVALID, r"content\[0\] \(image\): the image is too large: more pixels than the limit of 64000000"),
    # -- videos
    Case("video-without-frames", lambda s: {"content": [video_part(media.video_without_frames()), text_part("?")]},
         INVALID, r"content\[0\] \(video\): the video has no frames"),
    Case("video-without-video-stream", lambda s: {"content": [video_part(media.audio_only()), text_part("?")]},
         INVALID, r"content\[0\] \(video\): the file has no video stream"),
    Case("video-broken-container", lambda s: {"content": [video_part(media.write_video()[:600]), text_part("?")]},
         INVALID, r"content\[0\] \(video\): (cannot decode the video|the video has fewer decodable frames)"),
    Case("video-random-bytes", lambda s: {"content": [video_part(os.urandom(5000)), text_part("?")]},
         INVALID, r"content\[0\] \(video\): (cannot decode the video|unsupported video container)"),
    Case("video-unsupported-container", lambda s: {"content": [video_part(media.audio_only("wav")), text_part("?")]},
         INVALID, r"unsupported video container 'wav'; send MP4"),
    Case("video-too-many-frames", lambda s: {"content": [video_part(media.write_video(), num_segments=500),
                                                         text_part("?")]},
         INVALID, r"num_segments must be between 1 and 64, got 500"),
    Case("video-bound-outside", lambda s: {"content": [
        video_part(media.write_video(), bound=G.TimeBound(start_s=100, end_s=200)), text_part("?")]},
         INVALID, r"content\[0\] \(video\): bound .* lies outside the video"),
    # -- too much for the context
    Case("too-many-tiles-for-the-gateway", lambda s: {
        "content": [image_part(media.solid_png(1600, 1200, seed=i)) for i in range(10)] + [text_part("?")]},
         INVALID, r"take 130 tiles \(33280 tokens\); at most 128 fit: send fewer or smaller images"),
    Case("too-many-tiles-for-the-model", lambda s: {
        "content": [image_part(media.solid_png(900, 600, 10 + i)) for i in range(3)] + [text_part("?")],
        "max_num": 6}, INVALID, rf"the prompt has at least \d+ tokens; this model's context holds "
                                rf"{MAX_CONTEXT_TOKENS}"),
    Case("max-num-out-of-range", lambda s: {"content": [text_part("?")], "max_num": 0}, INVALID,
         r"max_num must be between 1 and 40, got 0"),
    Case("placeholder-mismatch", lambda s: {"content": [text_part("<image> and <image>: compare"),
                                                        image_part(media.noise_png(seed=3))]},
         INVALID, r"content has 2 <image> placeholder\(s\) but 1 images"),
    Case("reserved-markup", lambda s: {"content": [text_part("sneaky <IMG_CONTEXT> token")]},
         INVALID, r"content\[0\]: the text contains '<IMG_CONTEXT>', which only the server writes"),
    Case("empty-content", lambda s: {"content": []}, INVALID, r"content is empty"),
    Case("empty-part", lambda s: {"content": [G.ContentPart()]}, INVALID, r"content\[0\] is empty: set text, image"),
    # -- sampling
    Case("negative-temperature", lambda s: sampling(temperature=-0.5), INVALID, r"temperature must be a finite "
         r"number >= 0"),
    Case("nan-temperature", lambda s: sampling(temperature=math.nan), INVALID, r"temperature must be"),
    Case("infinite-temperature", lambda s: sampling(temperature=math.inf), INVALID, r"temperature must be"),
    Case("top-p-above-one", lambda s: sampling(top_p=1.5), INVALID, r"top_p must be in \[0, 1\], got 1.5"),
    Case("negative-top-k", lambda s: sampling(top_k=-3), INVALID, r"top_k must be >= 0"),
    Case("negative-repetition-penalty", lambda s: sampling(repetition_penalty=-1), INVALID,
         r"repetition_penalty must be"),
    Case("negative-max-new-tokens", lambda s: sampling(max_new_tokens=-1), INVALID, r"max_new_tokens must be >= 0"),
    Case("too-many-top-logprobs", lambda s: sampling(top_logprobs=1000), INVALID, r"top_logprobs must be in \[0, 20\]"),
    Case("too-many-stop-strings", lambda s: sampling(stop_strings=[f"s{i}" for i in range(40)]), INVALID,
         r"at most 16 stop strings"),
    Case("empty-stop-string", lambda s: sampling(stop_strings=[""]), INVALID, r"must not contain an empty string"),
    # -- sessions
    Case("unknown-session", lambda s: {"content": [text_part("Hi")], "session_id": "no-such-session"}, NOT_FOUND,
         r"session 'no-such-session' does not exist or has expired .*start a new one without session_id"),
    Case("malformed-session-id", lambda s: {"content": [text_part("Hi")], "session_id": "../../etc"}, INVALID,
         r"session_id must be 1-128 characters"),
    Case("expired-session", _expired_session, NOT_FOUND, r"does not exist or has expired"),
    # -- sizes
    Case("message-over-the-grpc-limit", lambda s: {"content": [image_part(b"\x89PNG" + bytes(MAX_MESSAGE_BYTES))]},
         EXHAUSTED, r"(?i)message larger than max"),
    Case("media-over-the-media-limit", lambda s: {"content": [image_part(b"\x89PNG" + bytes(MAX_MEDIA_BYTES)),
                                                              text_part("?")]},
         INVALID, rf"content\[0\] \(image\): \d+ bytes, above the limit of {MAX_MEDIA_BYTES}"),
    # -- sources
    Case("data-url-not-base64", lambda s: {"content": [G.ContentPart(image=G.ImageInput(
        url="data:image/png,rawbytes")), text_part("?")]}, INVALID, r"data: URLs must be base64"),
    Case("data-url-bad-base64", lambda s: {"content": [G.ContentPart(image=G.ImageInput(
        url="data:image/png;base64,@@not*base64@@")), text_part("?")]}, INVALID,
         r"content\[0\] \(image\): the data URL is not valid base64"),
    Case("remote-url", lambda s: {"content": [G.ContentPart(image=G.ImageInput(
        url="http://169.254.169.254/latest/meta-data")), text_part("?")]}, INVALID,
         r"remote URLs are not fetched; send a base64 data: URL"),
    Case("absolute-path-outside-root", lambda s: {"content": [G.ContentPart(image=G.ImageInput(path="/etc/passwd")),
                                                              text_part("?")]},
         DENIED, r"content\[0\] \(image\): '/etc/passwd' is outside the gateway's media root"),
    Case("relative-path-escaping-root", lambda s: {"content": [G.ContentPart(image=G.ImageInput(
        path="../../../../../../etc/passwd")), text_part("?")]}, DENIED, r"is outside the gateway's media root"),
    Case("symlink-escaping-root", _symlink_out, DENIED, r"'escape.png' is outside the gateway's media root"),
    Case("missing-file-in-root", lambda s: {"content": [G.ContentPart(image=G.ImageInput(path="nope.png")),
                                                        text_part("?")]},
         INVALID, r"no such file under the media root: 'nope.png'"),
]


def still_serving(stack) -> None:
    answer = chat(stack.stub, [text_part("Are you still there?")], max_new_tokens=2, timeout=30)
    assert answer.finish is not None and len(answer.token_ids) == 2


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_precisely(stack, case: Case):
    fields = case.build(stack)
    request = G.ChatRequest(**{k: v for k, v in fields.items() if k != "sampling"})
    if "sampling" in fields:
        request.sampling.CopyFrom(fields["sampling"])
    else:
        request.sampling.max_new_tokens = 2
    with pytest.raises(grpc.RpcError) as info:
        for _ in stack.stub.Chat(request, timeout=60):
            pass
    error = info.value
    assert error.code() == case.code, (error.code(), error.details())
    assert re.search(case.message, error.details()), error.details()
    assert_no_leak(error.details(), str(stack.media_root))
    if case.code != EXHAUSTED:  # refused by gRPC itself, before the handler, so no detail
        detail = error_detail(error)
        assert detail is not None and detail.code != common_pb2.ERROR_CODE_UNSPECIFIED
    still_serving(stack)


# ----------------------------------------------------------------------------------------------------------- HTTP


def post(stack, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(stack.http_url("/v1/chat/completions"), data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def user(*parts) -> dict:
    return {"messages": [{"role": "user", "content": list(parts)}], "max_tokens": 2}


HTTP_CASES = [
    ("not-json", b"{this is not json", 400, r"the body is not valid JSON"),
    ("not-an-object", b"[1, 2, 3]", 400, r"the body must be a JSON object"),
    ("no-messages", {"messages": []}, 400, r"messages must be a non-empty list"),
    ("bad-role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, r"unsupported role 'robot'"),
    ("stop-not-strings", {**user({"type": "text", "text": "hi"}), "stop": 5}, 400, r"stop must be a string"),
    ("temperature-not-a-number", {**user({"type": "text", "text": "hi"}), "temperature": "hot"}, 400,
     r"temperature has the wrong type"),
    ("temperature-overflows", {**user({"type": "text", "text": "hi"}), "temperature": 10**400}, 400,
     r"temperature is out of range"),
    ("negative-temperature", {**user({"type": "text", "text": "hi"}), "temperature": -1}, 400,
     r"temperature must be a finite number >= 0"),
    ("top-p-above-one", {**user({"type": "text", "text": "hi"}), "top_p": 2}, 400, r"top_p must be in \[0, 1\]"),
    ("max-tokens-beyond-int32", {**user({"type": "text", "text": "hi"}), "max_tokens": 2**40}, 400,
     r"max_new_tokens must be an integer below 2\*\*31"),
    ("negative-seed", {**user({"type": "text", "text": "hi"}), "seed": -5}, 400, r"seed must be in \[0, 2\*\*64\)"),
    ("video-num-segments-not-int", user({"type": "video", "video": {"path": "a.mp4", "num_segments": "many"}}), 400,
     r"num_segments must be an integer"),
    ("data-url-not-base64", user({"type": "image_url", "image_url": {"url": "data:image/png,xyz"}}), 400,
     r"data: URLs must be base64"),
    ("data-url-bad-base64", user({"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%%"}}), 400,
     r"the data URL is not valid base64"),
    ("data-url-not-an-image", user({"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"plain text, not a picture").decode()}}), 400,
     r"not a supported image format"),
    ("path-outside-root", user({"type": "image_url", "image_url": {"url": "/etc/shadow"}}), 403,
     r"is outside the gateway's media root"),
    ("unknown-session", {**user({"type": "text", "text": "hi"}), "session_id": "gone"}, 404,
     r"does not exist or has expired"),
    ("body-over-the-limit", b'{"messages": "' + b"x" * (2 * MAX_MEDIA_BYTES + 10) + b'"}', 413,
     r"the request body is larger than the limit of \d+ bytes"),
]


@pytest.mark.parametrize(("body", "status", "message"), [c[1:] for c in HTTP_CASES], ids=[c[0] for c in HTTP_CASES])
def test_bad_http_input_is_refused_precisely(stack, body, status, message):
    got, reply = post(stack, body)
    assert got == status, reply
    error = reply["error"]
    assert re.search(message, error["message"]), error
    assert_no_leak(error["message"], str(stack.media_root))
    ok, good = post(stack, user({"type": "text", "text": "still there?"}))
    assert ok == 200 and good["choices"][0]["finish_reason"] in ("stop", "length"), good
