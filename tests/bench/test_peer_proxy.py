"""The peer benchmark's round-robin proxy and its timed OpenAI client, against fake replicas in this process
(aiohttp servers on Unix sockets that stream server-sent events the way `vllm serve` does)."""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time

import pytest
from aiohttp import web

from bench.peer.openai_stream import Endpoint, get_ok, stream_chat
from bench.peer.round_robin import RoundRobinProxy

GAP_S = 0.3


def _chunk(content: str, tokens: int, **extra) -> bytes:
    entries = [{"token": "t", "logprob": -1.0, "top_logprobs": []} for _ in range(tokens)]
    choice = {"index": 0, "delta": {"content": content}, "logprobs": {"content": entries} if entries else None}
    return b"data: " + json.dumps({"choices": [choice], **extra}).encode() + b"\n\n"


async def _health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


class FakeReplicas:
    """`n` replicas on Unix sockets; each streams a role chunk, one token, then (after GAP_S) two tokens in one chunk
    naming the replica, a usage chunk and [DONE]; `bodies` records what each received."""

    def __init__(self, tmp_path, n: int):
        self.paths = [str(tmp_path / f"r{i}.sock") for i in range(n)]
        self.bodies: list[tuple[int, dict]] = []
        self.sent_second: list[float] = []
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        assert ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            for i, path in enumerate(self.paths):
                app = web.Application()
                app.router.add_post("/v1/chat/completions", functools.partial(self._chat, i=i))
                app.router.add_get("/health", _health)
                runner = web.AppRunner(app)
                await runner.setup()
                await web.UnixSite(runner, path).start()

        self._loop.run_until_complete(start())
        ready.set()
        self._loop.run_forever()

    async def _chat(self, request: web.Request, i: int) -> web.StreamResponse:
        self.bodies.append((i, await request.json()))
        reply = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await reply.prepare(request)
        await reply.write(_chunk("", 0))
        await reply.write(_chunk("a", 1))
        await asyncio.sleep(GAP_S)
        self.sent_second.append(time.perf_counter())
        await reply.write(_chunk(f"b{i}", 2, session_id=f"s{i}"))
        usage = {"prompt_tokens": 10, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 4}}
        await reply.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
        await reply.write(b"data: [DONE]\n\n")
        return reply

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)


@pytest.fixture
def replicas(tmp_path):
    fakes = FakeReplicas(tmp_path, 3)
    yield fakes
    fakes.stop()


def test_client_counts_tokens_by_logprob_entries(replicas):
    endpoint = Endpoint(model="m", uds=replicas.paths[1])
    t = stream_chat(endpoint, [{"role": "user", "content": "hi"}], 3, session_id="x")
    # The role chunk carries no token; then 1 token, then 2 in one chunk GAP_S later.
    assert [n for _, n in t.deltas] == [1, 2] and t.tokens == 3
    assert t.deltas[1][0] - t.deltas[0][0] >= GAP_S * 0.9
    assert t.text == "ab1" and t.session_id == "s1" and t.cached_prompt_tokens == 4
    assert 0 < t.ttft_s < GAP_S
    (_, body), = replicas.bodies
    assert body["max_tokens"] == 3 and body["temperature"] == 0 and body["stream"] is True
    assert body["logprobs"] is True and body["stream_options"] == {"include_usage": True}
    assert body["session_id"] == "x" and body["model"] == "m"


def test_proxy_sends_each_post_to_the_next_replica_and_streams(replicas):
    proxy = RoundRobinProxy([Endpoint(model="m", uds=path) for path in replicas.paths])
    try:
        assert get_ok(proxy.endpoint, "/health")
        timings = [stream_chat(proxy.endpoint, [{"role": "user", "content": str(k)}], 3) for k in range(4)]
        assert [t.text for t in timings] == ["ab0", "ab1", "ab2", "ab0"]
        assert proxy.served == [0, 1, 2, 0]
        assert [body["messages"][0]["content"] for _, body in replicas.bodies] == ["0", "1", "2", "3"]
        # Streamed through, not buffered: each first token reached the client before its replica sent the rest.
        for t, sent in zip(timings, replicas.sent_second, strict=True):
            assert t.deltas[0][0] < sent
    finally:
        proxy.stop()


def test_proxy_wants_unix_socket_replicas():
    with pytest.raises(ValueError):
        RoundRobinProxy([Endpoint(model="m", port=1)])
