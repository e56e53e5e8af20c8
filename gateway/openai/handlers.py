"""The aiohttp handlers of the OpenAI-compatible API: read and validate the body (`body`, `protocol`), run the chat through
the orchestrator, answer with one JSON response or a stream of server-sent events (`render`, `sse`).

A chat completion is recorded like a gRPC call: the same request families with method `openai.chat_completions`,
its status the one its error maps to (an error is answered as a body, so the handler sets it), time to first token
and tokens generated; a client that disconnects cancels the services' calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncGenerator, Callable

from aiohttp import web

from gateway.chat_response import Delta, Finish
from gateway.metrics import GatewayMetrics
from gateway.openai.body import read_json
from gateway.openai.protocol import parse
from gateway.openai.render import Completion, error_body
from gateway.openai.sse import EventStream
from gateway.orchestrator import Orchestrator
from services.contract.errors import RpcStatus, retry_after
from services.contract.priority import HEADER as PRIORITY_HEADER
from services.contract.priority import Priority
from services.runtime import request_ids
from services.runtime.request_metrics import RequestCall

RPC = "openai.chat_completions"
REQUEST_ID_KEY = web.RequestKey("request_id", str)


def max_body_bytes(config) -> int:
    """The largest HTTP request body read: room for one medium at the limit, base64-encoded (4/3), and the rest."""
    return config.max_media_bytes * 2


def _error_response(exc: BaseException, call: RequestCall) -> web.Response:
    status, body = error_body(exc, call)
    advice = retry_after(exc)  # a refusal under load says when to come back
    return web.json_response(body, status=status, headers={"Retry-After": advice} if advice is not None else None)


def header_priority(value: str | None) -> Priority | None:
    """The priority the `X-Request-Priority` header names (None when absent: the default decides)."""
    return None if value is None else Priority.parse(value)


class OpenAIHandlers:
    def __init__(self, orchestrator: Orchestrator, metrics: GatewayMetrics, is_ready: Callable[[], bool]):
        self.orchestrator = orchestrator
        self.metrics = metrics
        self.is_ready = is_ready

    @property
    def model_name(self) -> str:
        model = self.orchestrator.model
        return model.model_name if model is not None else "internvl"

    async def models(self, http: web.Request) -> web.Response:
        """The base model, then each LoRA adapter with the base as its `parent` (vLLM's field)."""
        base = self.model_name
        served = self.orchestrator.served_models() if self.orchestrator.model is not None else [(base, None)]
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "internvl-serve", "root": base,
             "parent": base if adapter is not None else None}
            for name, adapter in served]})

    async def health(self, http: web.Request) -> web.Response:
        return web.json_response({"ready": self.is_ready()}, status=200 if self.is_ready() else 503)

    async def chat_completions(self, http: web.Request) -> web.StreamResponse:
        with self.metrics.requests.track(RPC, http.headers.get(request_ids.HEADER)) as call:
            http[REQUEST_ID_KEY] = call.request_id  # echoed by the app on every response
            started = time.perf_counter()  # the time to first token counts the body's upload too
            try:
                priority = header_priority(http.headers.get(PRIORITY_HEADER))
                body = parse(await read_json(http, max_body_bytes(self.orchestrator.config)))
            except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error body
                return _error_response(exc, call)
            request = dataclasses.replace(body.chat_request(request_id=call.request_id), priority=priority)
            events = self.metrics.track_tokens(RPC, self.orchestrator.chat(request), started)
            async with contextlib.aclosing(events):
                try:  # a failure before the first event is answered with its status, even for a stream
                    first = await anext(events)
                except Exception as exc:  # noqa: BLE001
                    return _error_response(exc, call)
                completion = Completion.start(body.model if body.model is not None else self.model_name,
                                              body.reported_top_logprobs)
                if body.stream:
                    return await self._stream(http, call, completion, first, events, request.sampling.answers,
                                              body.include_usage)
                return await self._respond(call, completion, first, events)

    async def _respond(self, call: RequestCall, completion: Completion, first: Delta | Finish,
                       events: AsyncGenerator) -> web.Response:
        received = [first]
        try:
            async for event in events:
                received.append(event)
        except Exception as exc:  # noqa: BLE001
            return _error_response(exc, call)
        return web.json_response(completion.response(received))

    async def _stream(self, http: web.Request, call: RequestCall, completion: Completion, first: Delta | Finish,
                      events: AsyncGenerator, answers: int, include_usage: bool) -> web.StreamResponse:
        """Answers interleave, told apart by their index; each starts with a role chunk and ends with a finish
        chunk; a usage chunk follows the last when asked for. A failure mid-stream is sent as an error event."""
        stream = await EventStream.open(http)
        for index in range(answers):
            await stream.send(completion.role_chunk(index))
        event, finishes = first, []
        try:
            while True:
                if isinstance(event, Finish):
                    finishes.append(event)
                    await stream.send(completion.finish_chunk(event))
                    if len(finishes) == answers:
                        if include_usage:
                            await stream.send(completion.usage_chunk(finishes))
                        break
                else:
                    await stream.send(completion.delta_chunk(event))
                event = await anext(events)
        except (ConnectionResetError, ConnectionError):
            call.code = RpcStatus.CANCELLED.name
            return stream.response  # the client went away; closing `events` cancels the services' calls
        except Exception as exc:  # noqa: BLE001 - a stream fails with an error event
            _, error = error_body(exc, call)
            await stream.send(error)
        await stream.close()
        return stream.response
