"""The soak's request mix: one task per draw, each one or more requests over gRPC (`ChatService.Chat`) or the
OpenAI-compatible HTTP API, each reported as an `Outcome` with the status it ended with and whether that status was
the one expected.

Kinds (`KINDS`, drawn with their weights): text; images from a small pool (repeated, so mostly cache hits) and now
and then a new one; small video clips; three-turn sessions; constrained answers (a JSON schema over HTTP, a choice
over gRPC); streams cancelled after their first token; and refused requests (a body that is not an image, an unknown
session, sampling out of range), each expected with its status. A cancelled stream whose answer had already ended
(a random model may stop at once) counts as OK, which is also expected.
"""

from __future__ import annotations

import http.client
import json
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from internvl.common.v1 import common_pb2
from internvl.gateway.v1 import gateway_pb2 as G
from internvl.gateway.v1 import gateway_pb2_grpc

from bench.soak import media
from bench.workload import video_mp4

MAX_NEW = 6  # tokens per ordinary answer: the soak measures the stack's bookkeeping, not decoding
CANCEL_MAX_NEW = 256  # long enough that a cancel after the first token lands mid-stream
RPC_TIMEOUT_S = 120.0
IMAGE_POOL = 6  # distinct images the image requests repeat (cache hits after the first of each)
VIDEO_POOL = 3
SESSION_TURNS = 3
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 8}}, "required": ["answer"]}


@dataclass(frozen=True)
class Outcome:
    kind: str
    transport: str  # "grpc" or "http"
    code: str  # a gRPC status name (OK, CANCELLED, INVALID_ARGUMENT, ...) or an HTTP status ("200", "400", ...)
    expected: bool
    seconds: float


@dataclass
class Target:
    """Where requests go, and the media they reuse."""

    stub: gateway_pb2_grpc.ChatServiceStub
    http_base: str  # http://127.0.0.1:PORT
    images: list[bytes]
    clips: list[bytes]

    @classmethod
    def build(cls, channel: grpc.Channel, http_port: int) -> Target:
        return cls(gateway_pb2_grpc.ChatServiceStub(channel), f"http://127.0.0.1:{http_port}",
                   [media.noise_png(seed) for seed in range(IMAGE_POOL)],
                   [video_mp4(seed, frames=3, side=64) for seed in range(VIDEO_POOL)])


# ------------------------------------------------------------------------------------------------------- gRPC


def _sampling(max_new: int = MAX_NEW, **fields) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_new_tokens=max_new, **fields)


def _grpc_chat(t: Target, request: G.ChatRequest) -> tuple[str, str]:
    """(status name, session id) of one Chat read to its end."""
    session = ""
    try:
        for reply in t.stub.Chat(request, timeout=RPC_TIMEOUT_S):
            if reply.HasField("finish"):
                session = reply.finish.session_id
    except grpc.RpcError as error:
        return error.code().name, session
    return "OK", session


def _grpc_cancelled(t: Target, request: G.ChatRequest) -> str:
    """Chat, cancelled by the client as soon as the first token arrives: CANCELLED, or OK if it had ended first."""
    call = t.stub.Chat(request, timeout=RPC_TIMEOUT_S)
    try:
        for reply in call:
            if reply.HasField("delta") and reply.delta.token_ids:
                call.cancel()
            elif reply.HasField("finish"):
                return "OK"
    except grpc.RpcError as error:
        return error.code().name
    return "OK"


def _text(text: str) -> G.ContentPart:
    return G.ContentPart(text=text)


def _image(data: bytes) -> G.ContentPart:
    return G.ContentPart(image=G.ImageInput(data=data))


# ------------------------------------------------------------------------------------------------------- HTTP


def _http_post(t: Target, body: dict) -> tuple[str, dict]:
    """(HTTP status, JSON body) of one non-streaming chat completion."""
    request = urllib.request.Request(t.http_base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=RPC_TIMEOUT_S) as response:
            return str(response.status), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return str(error.code), json.loads(error.read() or b"{}")


def _http_stream(t: Target, body: dict, cancel_after_first: bool = False) -> str:
    """A streamed chat completion read to `data: [DONE]` ("200"), or closed after its first chunk ("CANCELLED")."""
    host, port = t.http_base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=RPC_TIMEOUT_S)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}),
                     {"content-type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            response.read()
            return str(response.status)
        for line in response:
            if line.startswith(b"data: [DONE]"):
                return "200"
            if cancel_after_first and line.startswith(b"data: ") and b'"content"' in line:
                return "CANCELLED"  # closing the connection (below) is the client going away
        return "EOF"  # the stream ended without [DONE]: a cut answer
    finally:
        conn.close()


def _messages(text: str, image: bytes | None = None) -> list[dict]:
    parts: list[dict] = [{"type": "text", "text": text}]
    if image is not None:
        parts.insert(0, {"type": "image_url", "image_url": {"url": media.data_url(image)}})
    return [{"role": "user", "content": parts}]


# ------------------------------------------------------------------------------------------------------ kinds
# Each kind: (target, rng, index) -> [(transport, code, expected codes), ...], one entry per request it sent.

Result = list[tuple[str, str, frozenset[str]]]
OK, OK_HTTP = frozenset({"OK"}), frozenset({"200"})
CANCEL_OK = frozenset({"CANCELLED", "OK", "200"})


def text_grpc(t: Target, rng: random.Random, i: int) -> Result:
    code, _ = _grpc_chat(t, G.ChatRequest(content=[_text(f"Question {i}: say something.")], sampling=_sampling()))
    return [("grpc", code, OK)]


def text_http(t: Target, rng: random.Random, i: int) -> Result:
    code, _ = _http_post(t, {"messages": _messages(f"Question {i}."), "max_tokens": MAX_NEW, "temperature": 0})
    return [("http", code, OK_HTTP)]


def image_grpc(t: Target, rng: random.Random, i: int) -> Result:
    # One in eight is an image never seen before: the cache keeps filling, as it does in production.
    data = media.noise_png(10_000 + i) if i % 8 == 0 else rng.choice(t.images)
    code, _ = _grpc_chat(t, G.ChatRequest(content=[_image(data), _text("Describe it.")], sampling=_sampling()))
    return [("grpc", code, OK)]


def image_http_stream(t: Target, rng: random.Random, i: int) -> Result:
    body = {"messages": _messages("What is this?", rng.choice(t.images)), "max_tokens": MAX_NEW, "temperature": 0}
    return [("http", _http_stream(t, body), OK_HTTP)]


def video_grpc(t: Target, rng: random.Random, i: int) -> Result:
    part = G.ContentPart(video=G.VideoInput(data=rng.choice(t.clips), num_segments=2))
    code, _ = _grpc_chat(t, G.ChatRequest(content=[part, _text("What happens?")], sampling=_sampling()))
    return [("grpc", code, OK)]


def session_grpc(t: Target, rng: random.Random, i: int) -> Result:
    """Three turns of one session: an image, then two text follow-ups on the stored history."""
    first = G.ChatRequest(content=[_image(rng.choice(t.images)), _text("Look at this.")], sampling=_sampling())
    code, session = _grpc_chat(t, first)
    results = [("grpc", code, OK)]
    for turn in range(2, SESSION_TURNS + 1):
        if code != "OK":
            break
        follow = G.ChatRequest(content=[_text(f"Turn {turn}: and then?")], session_id=session, sampling=_sampling())
        code, _ = _grpc_chat(t, follow)
        results.append(("grpc", code, OK))
    return results


def json_schema_http(t: Target, rng: random.Random, i: int) -> Result:
    body = {"messages": _messages("Answer in JSON."), "max_tokens": 24, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}}
    code, _ = _http_post(t, body)
    return [("http", code, OK_HTTP)]


def choice_grpc(t: Target, rng: random.Random, i: int) -> Result:
    constraint = common_pb2.Constraint(choice=common_pb2.ChoiceList(choices=["yes", "no", "maybe"]))
    request = G.ChatRequest(content=[_text("Yes or no?")], sampling=_sampling(constraint=constraint))
    code, _ = _grpc_chat(t, request)
    return [("grpc", code, OK)]


def cancel_grpc(t: Target, rng: random.Random, i: int) -> Result:
    request = G.ChatRequest(content=[_image(rng.choice(t.images)), _text("Tell a long story.")],
                            sampling=_sampling(CANCEL_MAX_NEW))
    return [("grpc", _grpc_cancelled(t, request), CANCEL_OK)]


def cancel_http(t: Target, rng: random.Random, i: int) -> Result:
    body = {"messages": _messages("Tell a long story."), "max_tokens": CANCEL_MAX_NEW, "temperature": 0}
    return [("http", _http_stream(t, body, cancel_after_first=True), CANCEL_OK)]


def refused_bad_image(t: Target, rng: random.Random, i: int) -> Result:
    code, _ = _grpc_chat(t, G.ChatRequest(content=[_image(media.NOT_AN_IMAGE), _text("?")], sampling=_sampling()))
    return [("grpc", code, frozenset({"INVALID_ARGUMENT"}))]


def refused_unknown_session(t: Target, rng: random.Random, i: int) -> Result:
    body = {"messages": _messages("Go on."), "max_tokens": MAX_NEW, "session_id": f"soak-unknown-{i}"}
    code, _ = _http_post(t, body)
    return [("http", code, frozenset({"404"}))]


def refused_sampling(t: Target, rng: random.Random, i: int) -> Result:
    if i % 2:
        code, _ = _grpc_chat(t, G.ChatRequest(content=[_text("?")], sampling=_sampling(temperature=-1.0)))
        return [("grpc", code, frozenset({"INVALID_ARGUMENT"}))]
    code, _ = _http_post(t, {"messages": _messages("?"), "max_tokens": MAX_NEW, "top_p": 2.0})
    return [("http", code, frozenset({"400"}))]


Kind = Callable[[Target, random.Random, int], Result]
# (kind, weight): of the requests about 73% answered, 12% cancelled, 14% refused (a session is three requests).
KINDS: tuple[tuple[Kind, int], ...] = (
    (text_grpc, 10), (text_http, 8), (image_grpc, 10), (image_http_stream, 8), (video_grpc, 6),
    (session_grpc, 4), (json_schema_http, 5), (choice_grpc, 5), (cancel_grpc, 6), (cancel_http, 5),
    (refused_bad_image, 4), (refused_unknown_session, 4), (refused_sampling, 4),
)


def draw(rng: random.Random) -> Kind:
    kinds, weights = zip(*KINDS, strict=True)
    return rng.choices(kinds, weights)[0]


def requests_of(kind: Kind) -> int:
    """How many requests a task of `kind` sends when each succeeds."""
    return SESSION_TURNS if kind is session_grpc else 1


def run_task(t: Target, kind: Kind, seed: int) -> list[Outcome]:
    """One task of `kind` (its own rng from `seed`, so a run repeats), each request as an Outcome; an exception
    of the client itself (a connection refused, a timeout) is an unexpected outcome named after it."""
    started = time.perf_counter()
    try:
        results = kind(t, random.Random(seed), seed)
    except Exception as error:  # noqa: BLE001 - any failure is reported, and fails the run, rather than lost
        results = [("?", type(error).__name__, frozenset())]
    seconds = (time.perf_counter() - started) / max(1, len(results))
    return [Outcome(kind.__name__, transport, code, code in expected, seconds)
            for transport, code, expected in results]


KIND_NAMES = tuple(k.__name__ for k, _ in KINDS)
