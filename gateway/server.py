"""`internvl-serve gateway`: the public gRPC ChatService and the OpenAI-compatible HTTP API, on one event loop.

The servicer only translates (gateway.types) and delegates to the transport-free orchestrator. Domain errors go to the
shared interceptor; the few gateway errors with a more precise status (NOT_FOUND for an unknown session,
PERMISSION_DENIED for a path outside the media root, ABORTED for a busy session, DEADLINE_EXCEEDED) are aborted here
with that status and the same ErrorDetail trailer.

Start-up: bind and answer health checks (NOT_SERVING), wait until both services answer GetModelInfo with the same
model fingerprint, then report SERVING. SIGTERM: NOT_SERVING, drain running streams, stop HTTP, close the clients.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

import grpc
from aiohttp import web
from internvl.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from gateway import config as gateway_config
from gateway.auth import BearerTokenInterceptor
from gateway.clients import LLMClient, VisionClient
from gateway.config import GatewayConfig
from gateway.errors import grpc_status_name
from gateway.metrics import GatewayMetrics
from gateway.openai_http import create_app
from gateway.orchestrator import Orchestrator
from gateway.sessions import MemorySessionStore, RedisSessionStore
from gateway.types import ChatRequest
from services.common.errors import InternVLError
from services.common.grpc_errors import DETAIL_METADATA_KEY, status_for
from services.common.grpc_server import GrpcServer
from services.common.redis_client import connect as connect_redis

log = logging.getLogger(__name__)

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name  # internvl.gateway.v1.ChatService


async def _abort_precisely(context: grpc.aio.ServicerContext, exc: InternVLError) -> None:
    """Aborts with the gateway error's own status when it has one; otherwise leaves it to the interceptor."""
    name = grpc_status_name(exc)
    if name is None:
        return
    _, message, detail = status_for(exc)
    log.info("%s: %s", name, message)
    await context.abort(grpc.StatusCode[name], message,
                        trailing_metadata=((DETAIL_METADATA_KEY, detail.SerializeToString()),))


class ChatServicer(gateway_pb2_grpc.ChatServiceServicer):
    def __init__(self, orchestrator: Orchestrator, metrics: GatewayMetrics):
        self.orchestrator = orchestrator
        self.metrics = metrics

    async def _events(self, request: gateway_pb2.ChatRequest, timeout: float | None):
        chat = ChatRequest.from_pb(request)
        async with contextlib.aclosing(self.orchestrator.chat(chat, timeout)) as events:
            async for event in events:
                yield event

    async def Chat(self, request: gateway_pb2.ChatRequest, context):
        events = self.metrics.track_stream("Chat", self._events(request, context.time_remaining()))
        async with contextlib.aclosing(events):
            try:
                async for event in events:
                    yield event.to_pb()
            except InternVLError as exc:
                await _abort_precisely(context, exc)
                raise

    async def BatchChat(self, request: gateway_pb2.BatchChatRequest, context):
        try:
            with self.metrics.track("BatchChat"):
                requests = []
                for index, item in enumerate(request.requests):
                    try:
                        requests.append(ChatRequest.from_pb(item))
                    except InternVLError as exc:
                        exc.args = (f"requests[{index}]: {exc}",)
                        raise
                results = await self.orchestrator.batch_chat(requests, context.time_remaining())
        except InternVLError as exc:
            await _abort_precisely(context, exc)
            raise
        self.metrics.generated_tokens.labels("BatchChat").inc(sum(len(r.token_ids) for r in results))
        return gateway_pb2.BatchChatResponse(results=[r.to_pb() for r in results])


def _session_store(config: GatewayConfig) -> RedisSessionStore | MemorySessionStore:
    if config.redis_url is None:
        log.warning("no --redis-url: sessions live in this process only (one gateway replica, lost on restart)")
        return MemorySessionStore(config.session_ttl_s)
    return RedisSessionStore(connect_redis(config.redis_url), config.namespace, config.session_ttl_s)


async def _start_http(config: GatewayConfig, app: web.Application) -> web.AppRunner:
    # handler_cancellation: a client that disconnects cancels its handler, and so the services' calls.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=config.server.drain_seconds,
                           handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, config.server.host, config.http_port).start()
    log.info("OpenAI-compatible HTTP API on %s:%d", config.server.host, config.http_port)
    return runner


async def serve(config: GatewayConfig) -> None:
    metrics = GatewayMetrics()
    vision = VisionClient(config.vision_target, config.server.max_message_bytes, config.upstream_tls,
                          on_retry=lambda method: metrics.upstream_retries.labels("vision", method).inc())
    llm = LLMClient(config.llm_target, config.server.max_message_bytes, config.upstream_tls)
    sessions = _session_store(config)
    orchestrator = Orchestrator(config, vision, llm, sessions, metrics)
    interceptors = [BearerTokenInterceptor(config.api_token)] if config.api_token else []
    server = GrpcServer(config.server, [SERVICE_NAME], interceptors)
    server.add(gateway_pb2_grpc.add_ChatServiceServicer_to_server, ChatServicer(orchestrator, metrics))
    ready = stopped = False
    runner = None
    try:
        await server.start(registry=metrics.registry)
        if config.http_port is not None:
            runner = await _start_http(config, create_app(orchestrator, metrics, lambda: ready))
        if isinstance(sessions, RedisSessionStore):
            await sessions.redis.ping()
        log.info("waiting for the vision service (%s) and the LLM service (%s)", config.vision_target,
                 config.llm_target)
        await orchestrator.connect()
        ready = True
        await server.mark_ready()
        await server.serve_until_signalled()  # SIGTERM: NOT_SERVING, then running calls get drain_seconds
        stopped = True
    finally:
        if not stopped:
            await server.stop()
        if runner is not None:
            await runner.cleanup()
        await orchestrator.close()
        await asyncio.gather(vision.close(), llm.close(), sessions.close(), return_exceptions=True)
        log.info("gateway stopped")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gateway_config.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    asyncio.run(serve(GatewayConfig.from_args(args)))
    return 0
