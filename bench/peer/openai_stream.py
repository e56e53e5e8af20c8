"""A timed client of an OpenAI chat-completions API: one streamed request, every token's arrival time.

The same client, the same request body and the same images (data URLs) for every side of the peer benchmark: `vllm
serve` (over its Unix socket, or through the round-robin proxy's TCP port) and our gateway's OpenAI HTTP API. Each
request is greedy (`temperature` 0), streamed with `stream_options.include_usage`, and asks for `logprobs`: both
servers then put one logprob entry per generated token in the chunk that carries it, so a chunk's token count is
exact even when a server sends several tokens in one chunk (vLLM does when its output lags its steps) or one token
with no text (an incomplete UTF-8 sequence). The cost is one log-softmax per token on both sides alike.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class Endpoint:
    """Where an OpenAI API listens: a TCP port on the loopback, or a Unix socket (`uds`); `model` is the id it
    serves."""

    model: str
    port: int | None = None
    uds: str | None = None
    host: str = "127.0.0.1"

    def connection(self) -> http.client.HTTPConnection:
        if self.uds is not None:
            return _UnixConnection(self.uds)
        return http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT_S)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=TIMEOUT_S)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


@dataclass
class StreamTiming:
    """One streamed answer: when it was sent, each token-carrying chunk's (arrival time, tokens), the answer text,
    the usage the server reported, and our session id (empty from `vllm serve`)."""

    started: float
    deltas: list[tuple[float, int]] = field(default_factory=list)
    finished: float = 0.0
    text: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    session_id: str = ""

    @property
    def ttft_s(self) -> float:
        return self.deltas[0][0] - self.started if self.deltas else float("nan")

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.deltas)

    @property
    def cached_prompt_tokens(self) -> int:
        return (self.usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def image_url_part(data: bytes, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def request_body(endpoint: Endpoint, messages: list[dict], max_tokens: int, **extra: Any) -> dict:
    return {"model": endpoint.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "logprobs": True, **extra}


def post_json(endpoint: Endpoint, path: str, body: dict) -> dict:
    """A non-streamed POST; the decoded JSON reply (raises on a status other than 200)."""
    conn = endpoint.connection()
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        reply = conn.getresponse()
        data = reply.read()
        if reply.status != 200:
            raise RuntimeError(f"POST {path}: HTTP {reply.status}: {data[:500]!r}")
        return json.loads(data)
    finally:
        conn.close()


def stream_chat(endpoint: Endpoint, messages: list[dict], max_tokens: int, *, started: float | None = None,
                **extra: Any) -> StreamTiming:
    """One greedy streamed chat completion, timed from `started` (default: now) to the end of the stream."""
    body = json.dumps(request_body(endpoint, messages, max_tokens, **extra))
    timing = StreamTiming(started=started if started is not None else time.perf_counter())
    conn = endpoint.connection()
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        reply = conn.getresponse()
        if reply.status != 200:
            raise RuntimeError(f"chat completion: HTTP {reply.status}: {reply.read()[:500]!r}")
        texts = []
        for line in reply:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"chat completion failed mid-stream: {chunk['error']}")
            timing.session_id = chunk.get("session_id") or timing.session_id
            if chunk.get("usage"):
                timing.usage = chunk["usage"]
            for choice in chunk.get("choices") or ():
                entries = ((choice.get("logprobs") or {}).get("content")) or []
                if entries:
                    timing.deltas.append((now, len(entries)))
                texts.append((choice.get("delta") or {}).get("content") or "")
        timing.text = "".join(texts)
    finally:
        conn.close()
    timing.finished = time.perf_counter()
    return timing


def get_text(endpoint: Endpoint, path: str) -> str:
    """The body of GET `path` (raises on a status other than 200)."""
    conn = endpoint.connection()
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        body = reply.read().decode(errors="replace")
        if reply.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {reply.status}: {body[:500]}")
        return body
    finally:
        conn.close()


def get_ok(endpoint: Endpoint, path: str, timeout_s: float = 5.0) -> bool:
    """Whether GET `path` answers 200 now (False on any connection error)."""
    conn = endpoint.connection()
    conn.timeout = timeout_s
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()
