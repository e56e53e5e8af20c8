"""Server-sent events as OpenAI streams them: each chunk a `data: <json>` event, the stream ended by `data: [DONE]`."""

from __future__ import annotations

import json

from aiohttp import web


class EventStream:
    """One streaming response; `open` sends its headers."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response

    @classmethod
    async def open(cls, http: web.Request) -> EventStream:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(http)
        return cls(response)

    async def send(self, payload: dict) -> None:
        await self._event(json.dumps(payload, ensure_ascii=False))

    async def close(self) -> None:
        """`[DONE]`, then the end of the body."""
        await self._event("[DONE]")
        await self.response.write_eof()

    async def _event(self, data: str) -> None:
        await self.response.write(f"data: {data}\n\n".encode())
