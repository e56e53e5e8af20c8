"""The aiohttp application of the OpenAI-compatible API: its routes, body limit, bearer token and request ids, and its
OpenAPI document (`openapi`)."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from gateway.auth import Access, http_middleware
from gateway.metrics import GatewayMetrics
from gateway.openai.handlers import REQUEST_ID_KEY, OpenAIHandlers, max_body_bytes
from gateway.openai.openapi import document_bytes
from gateway.orchestrator import Orchestrator
from gateway.tenant_limits import TenantLimits
from services.runtime import request_ids


async def _echo_request_id(http: web.Request, response: web.StreamResponse) -> None:
    """Every chat completion's response, errors and streams included, carries its request id."""
    if REQUEST_ID_KEY in http:
        response.headers[request_ids.HEADER] = http[REQUEST_ID_KEY]


async def _openapi(http: web.Request) -> web.Response:
    return web.Response(body=document_bytes(), content_type="application/json")


def create_app(orchestrator: Orchestrator, metrics: GatewayMetrics, is_ready: Callable[[], bool],
               access: Access | None = None, limits: TenantLimits | None = None) -> web.Application:
    """`access` names each request's tenant (default: the config's token, else everyone `anonymous`), `limits` holds
    tenants to their limits (default: limits of this app's own)."""
    handlers = OpenAIHandlers(orchestrator, metrics, is_ready)
    access = access if access is not None else Access(token=orchestrator.config.api_token)
    # With tracing on, OpenTelemetry's instrumentation puts its middleware first (services.runtime.tracing).
    app = web.Application(client_max_size=max_body_bytes(orchestrator.config),
                          middlewares=[http_middleware(access, limits or TenantLimits(), metrics)])
    app.on_response_prepare.append(_echo_request_id)
    app.router.add_post("/v1/chat/completions", handlers.chat_completions)
    app.router.add_get("/v1/models", handlers.models)
    app.router.add_get("/health", handlers.health)
    app.router.add_get("/openapi.json", _openapi)
    return app
