"""A small round-robin HTTP proxy in front of several `vllm serve` replicas: the load balancer an operator puts before
a pool of stateless OpenAI servers (nginx's or Kubernetes' default).

Each POST goes to the next replica in turn, whatever it asks; the reply is streamed back chunk by chunk as it
arrives. GETs (`/health`) go to the first. It runs on an event loop of its own in a thread of the benchmark's
process, on a loopback TCP port it binds itself (port 0), and records which replica served each POST (`served`).
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
from collections.abc import Sequence

import aiohttp
from aiohttp import web

from bench.peer.openai_stream import Endpoint

# Hop-by-hop and length headers are the proxy's own business, not the replica's.
_DROPPED = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class RoundRobinProxy:
    """Until `stop()`; `endpoint` is the proxy's own (the backends' model id, its TCP port)."""

    def __init__(self, backends: Sequence[Endpoint]):
        if not backends or any(b.uds is None for b in backends):
            raise ValueError("the proxy forwards to replicas on Unix sockets")
        self.backends = list(backends)
        self.served: list[int] = []
        self._next = itertools.cycle(range(len(self.backends)))
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.endpoint = Endpoint(model=self.backends[0].model, port=self._sock.getsockname()[1])
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="round-robin-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the round-robin proxy did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        for session in self._sessions:
            self._loop.run_until_complete(session.close())
        self._loop.close()

    async def _start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        self._sessions = [aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=b.uds), timeout=timeout)
                          for b in self.backends]
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        index = next(self._next) if request.method == "POST" else 0
        if request.method == "POST":
            self.served.append(index)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROPPED}
        async with self._sessions[index].request(request.method, f"http://localhost{request.path_qs}",
                                                 data=await request.read(), headers=headers) as upstream:
            reply = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in _DROPPED})
            await reply.prepare(request)
            async for chunk in upstream.content.iter_any():
                await reply.write(chunk)
            await reply.write_eof()
            return reply

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
