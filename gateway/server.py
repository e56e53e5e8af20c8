"""`internvl-serve gateway`: the public gRPC ChatService and the OpenAI-compatible HTTP API, on one event loop.

The servicer only translates (gateway.chat_request, gateway.chat_response) and delegates to the transport-free
orchestrator. Domain errors, the gateway's own included (gateway.errors: each has its own code and status), go to
the shared interceptors, which abort the call with the status of the error's code and record the request
(services.runtime.grpc_server); a stream that fails after some deltas ends with that status and no finish message.

Start-up: bind and answer health checks (NOT_SERVING), wait until both services answer GetModelInfo with the same
model fingerprint, then report SERVING. SIGTERM: NOT_SERVING, drain running streams, stop HTTP, close the clients.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging

import grpc
from aiohttp import web
from internvl.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from gateway import config as gateway_config
from gateway.auth import Access, TenantInterceptor
from gateway.chat_request import ChatRequest
from gateway.clients import open_clients
from gateway.config import GatewayConfig
from gateway.endpoints import EndpointPool
from gateway.metrics import GatewayMetrics
from gateway.openai.app import create_app
from gateway.orchestrator import Orchestrator
from gateway.sessions import MemorySessionStore, RedisSessionStore
from gateway.tenant_limits import TenantLimits
from services.contract.errors import InternVLError
from services.contract.service_names import GATEWAY_SERVICE
from services.runtime import request_ids, tracing
from services.runtime.grpc_server import GrpcServer
from services.runtime.ports import bind_error
from services.runtime.redis_client import connect as connect_redis

log = logging.getLogger(__name__)



class ChatServicer(gateway_pb2_grpc.ChatServiceServicer):
    def __init__(self, orchestrator: Orchestrator, metrics: GatewayMetrics):
        self.orchestrator = orchestrator
        self.metrics = metrics

    async def _events(self, request: gateway_pb2.ChatRequest, request_id: str, timeout: float | None):
        chat = dataclasses.replace(ChatRequest.from_pb(request), request_id=request_id)
        async with contextlib.aclosing(self.orchestrator.chat(chat, timeout)) as events:
            async for event in events:
                yield event

    async def Chat(self, request: gateway_pb2.ChatRequest, context):
        request_id = await _adopt_request_id(request.request_id, context)
        events = self.metrics.track_tokens("Chat", self._events(request, request_id, context.time_remaining()))
        async with contextlib.aclosing(events):
            async for event in events:
                yield event.to_pb()

    async def BatchChat(self, request: gateway_pb2.BatchChatRequest, context):
        call_id = await _adopt_request_id("", context)
        requests = []
        for index, item in enumerate(request.requests):
            try:
                chat = ChatRequest.from_pb(item)
            except InternVLError as exc:
                exc.args = (f"requests[{index}]: {exc}",)
                raise
            requests.append(dataclasses.replace(chat, request_id=request_ids.accepted(
                item.request_id or f"{call_id}.{index}")))
        results = await self.orchestrator.batch_chat(requests, context.time_remaining())
        self.metrics.generated_tokens.labels("BatchChat").inc(sum(len(r.token_ids) for r in results))
        return gateway_pb2.BatchChatResponse(results=[r.to_pb() for r in results])

    async def ListModels(self, request: gateway_pb2.ListModelsRequest, context) -> gateway_pb2.ListModelsResponse:
        served = self.orchestrator.served_models()
        base = served[0][0]
        return gateway_pb2.ListModelsResponse(models=[
            gateway_pb2.ServedModel(id=name, parent=base if adapter else "", adapter=adapter.to_pb() if adapter
                                    else None) for name, adapter in served])


async def _adopt_request_id(field: str, context: grpc.aio.ServicerContext) -> str:
    """The call's request id (`request_ids.adopt`), returned to the caller at once in the initial metadata."""
    request_id = request_ids.adopt(field, context.invocation_metadata())
    await context.send_initial_metadata(((request_ids.HEADER, request_id),))
    return request_id


def _session_store(config: GatewayConfig) -> RedisSessionStore | MemorySessionStore:
    if config.redis_url is None:
        log.warning("no --redis-url: sessions live in this process only (one gateway replica, lost on restart)")
        return MemorySessionStore(config.session_ttl_s)
    return RedisSessionStore(connect_redis(config.redis_url), config.namespace, config.session_ttl_s)


async def _start_http(config: GatewayConfig, app: web.Application) -> tuple[web.AppRunner, int]:
    """The HTTP API served, and the port it bound (any free one for `--http-port 0`)."""
    # handler_cancellation: a client that disconnects cancels its handler, and so the services' calls.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=config.server.drain_seconds,
                           handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, config.server.host, config.http_port).start()
    except OSError as exc:
        await runner.cleanup()
        raise bind_error("--http-port", config.server.host, config.http_port, exc) from None
    port = runner.addresses[0][1]
    log.info("OpenAI-compatible HTTP API on %s:%d", config.server.host, port)
    return runner, port


async def serve(config: GatewayConfig) -> None:
    metrics = GatewayMetrics()
    vision, llm = await open_clients(config, metrics)
    sessions = _session_store(config)
    orchestrator = Orchestrator(config, vision, llm, sessions, metrics)
    access, limits = Access.from_config(config), TenantLimits()
    server = GrpcServer(config.server, [GATEWAY_SERVICE], [TenantInterceptor(access, limits, metrics)],
                        requests=metrics.requests)
    server.add(gateway_pb2_grpc.add_ChatServiceServicer_to_server, ChatServicer(orchestrator, metrics))
    ready = stopped = False
    runner = None
    try:
        await server.start()
        if config.http_port is not None:
            runner, http_port = await _start_http(config, create_app(orchestrator, metrics, lambda: ready,
                                                                     access, limits))
            server.report_ports(http_port=http_port)
        else:
            server.report_ports()
        if isinstance(sessions, RedisSessionStore):
            await sessions.redis.ping()
        log.info("waiting for the vision service (%s) and the LLM service (%s)", config.vision_target,
                 config.llm_target)
        await orchestrator.connect()
        ready = True
        await server.mark_ready()
        watch = asyncio.ensure_future(_follow_pools(server, vision.pool, llm.pool))
        try:
            await server.serve_until_signalled()  # SIGTERM: NOT_SERVING, then running calls get drain_seconds
        finally:
            watch.cancel()
        stopped = True
    finally:
        if not stopped:
            await server.stop()
        if runner is not None:
            await runner.cleanup()
        await orchestrator.close()
        await asyncio.gather(vision.close(), llm.close(), sessions.close(), return_exceptions=True)
        log.info("gateway stopped")


async def _follow_pools(server: GrpcServer, *pools: EndpointPool, interval_s: float = 1.0) -> None:
    """Readiness follows the pools: NOT_SERVING while a pool has no ready replica (saying which target), SERVING
    again once it has one, so a load balancer sends callers only to gateways that can answer them."""
    serving = True
    while True:
        await asyncio.sleep(interval_s)
        empty = [pool for pool in pools if not pool.ready_loads()]
        if empty and serving:
            for pool in empty:
                log.warning("not serving: %s", pool.unavailable(pool.name))
            await server.mark_not_ready()
        elif not empty and not serving:
            log.info("serving again: every pool has a ready replica")
            await server.mark_ready()
        serving = not empty


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gateway_config.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = GatewayConfig.from_args(args)
    with tracing.traced_process("gateway", config.server.otlp_endpoint):
        asyncio.run(serve(config))
    return 0
