"""Who calls the gateway's public APIs: a gRPC server interceptor and an aiohttp middleware that name each call's
tenant (`gateway.tenants`), refuse the calls they cannot name, and hold each tenant to its limits.

With an API-key file or a token configured, every call to `internvl.gateway.v1` must carry `authorization: Bearer
<key>` (gRPC metadata) and every `/v1/...` HTTP request the same `Authorization` header; anything else is refused
before any work, with UNAUTHENTICATED (HTTP 401). With mutual TLS and neither, the client certificate's CN names the
gRPC caller. Health (`grpc.health.v1`, `/health`), reflection and `/metrics` stay open for probes and scrapers.

A named call runs as its tenant: the tenant names its log lines and is the `internvl.tenant` attribute of its span,
and chat calls (gRPC Chat and BatchChat, HTTP chat completions) are admitted by the tenant's limits
(`gateway.tenant_limits`): over one, RESOURCE_EXHAUSTED with `retry-after` trailing metadata (HTTP 429 with
`Retry-After`).
"""

from __future__ import annotations

import contextlib
import hmac
import logging

import grpc
from aiohttp import web

from gateway import tenants
from gateway.metrics import GatewayMetrics
from gateway.openai.handlers import REQUEST_ID_KEY, RPC
from gateway.openai.render import error_body
from gateway.tenant_limits import TenantLimitError, TenantLimits
from gateway.tenants import KeyDirectory, Tenant
from services.contract.errors import retry_after
from services.runtime import request_ids, tracing
from services.runtime.grpc_errors import abort

log = logging.getLogger(__name__)

# The gRPC services the check protects (method names start with "/<service>/").
PROTECTED_PREFIX = "/internvl.gateway."
# The calls a tenant's limits apply to: those that make the services work.
LIMITED_METHODS = frozenset({"Chat", "BatchChat"})
LIMITED_PATHS = frozenset({"/v1/chat/completions"})
TENANT_ATTRIBUTE = "internvl.tenant"
UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token: send the header 'authorization: Bearer <token>'"
CERTIFICATE_MESSAGE = ("the client certificate's subject CN names the tenant: it must be 1-64 letters, digits, '.', "
                       "'_' or '-'")
# gRPC's auth context entry holding the client certificate's subject common name (mutual TLS).
COMMON_NAME = "x509_common_name"


class TokenCheck:
    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def accepts(self, header: str | bytes | None) -> bool:
        if header is None:
            return False
        value = header.encode() if isinstance(header, str) else bytes(header)
        # "Bearer" is case-insensitive (RFC 6750 follows RFC 7235); the token is not.
        if value[:7].lower() == b"bearer ":
            value = b"Bearer " + value[7:].strip()
        return hmac.compare_digest(value, self._expected)


def bearer(header: str | bytes | None) -> str | None:
    """The credential of an `authorization` value `Bearer <credential>` (scheme in any case), else None."""
    if header is None:
        return None
    value = header if isinstance(header, str) else bytes(header).decode(errors="replace")
    if value[:7].lower() != "bearer ":
        return None
    return value[7:].strip() or None


class Access:
    """Names the tenant of a call from the first configured source: the API-key file, the single token (tenant
    `default`), the client certificate's CN (gRPC with mutual TLS), else `anonymous` (see `gateway.tenants`)."""

    def __init__(self, keys: KeyDirectory | None = None, token: str | None = None,
                 client_certificates: bool = False):
        self.keys = keys
        self.token = None if token is None else TokenCheck(token)
        self.client_certificates = client_certificates and keys is None and token is None

    @classmethod
    def from_config(cls, config) -> Access:
        tls = config.server.tls
        return cls(config.api_keys, config.api_token, tls is not None and tls.client_ca is not None)

    def identify(self, authorization: str | bytes | None, common_names: list[bytes] | None = None) -> Tenant | None:
        """The caller's tenant, from its `authorization` value and (gRPC under mutual TLS) its certificate's CNs;
        None when it must be refused."""
        if self.keys is not None:
            key = bearer(authorization)
            return None if key is None else self.keys.find(key)
        if self.token is not None:
            return Tenant(tenants.DEFAULT) if self.token.accepts(authorization) else None
        if self.client_certificates and common_names is not None:
            name = common_names[0].decode(errors="replace") if len(common_names) == 1 else ""
            return Tenant(name) if tenants.NAME_PATTERN.match(name) else None
        return Tenant(tenants.ANONYMOUS)

    def refusal(self) -> str:
        """What a refused caller is told."""
        return CERTIFICATE_MESSAGE if self.client_certificates else UNAUTHENTICATED_MESSAGE


# ------------------------------------------------------------------------------------------------------- gRPC


class TenantInterceptor(grpc.aio.ServerInterceptor):
    """Names the tenant of every call to the public services, refusing those it cannot, and admits chat calls by
    their tenant's limits. Each call is served in a task of its own, so the tenant set here lasts the call."""

    def __init__(self, access: Access, limits: TenantLimits, metrics: GatewayMetrics):
        self.access = access
        self.limits = limits
        self.metrics = metrics

    async def _enter(self, context: grpc.aio.ServicerContext, method: str) -> contextlib.AbstractContextManager:
        """The tenant made current and admitted (the returned block holds its admission); aborts the call when it
        is unnamed or over a limit."""
        metadata = dict(context.invocation_metadata() or ())
        names = context.auth_context().get(COMMON_NAME) if self.access.client_certificates else None
        tenant = self.access.identify(metadata.get("authorization"), names)
        if tenant is None:
            log.info("refused %s: %s", method, self.access.refusal())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, self.access.refusal())
        tenants.enter(tenant)
        tracing.set_attributes({TENANT_ATTRIBUTE: tenant.name})
        if method.rsplit("/", 1)[-1] not in LIMITED_METHODS:
            return contextlib.nullcontext()
        try:
            return self.limits.admit(tenant)
        except TenantLimitError as exc:
            self.metrics.tenant_limited.labels(tenant.name, exc.limit).inc()
            await abort(context, exc, method)
            raise  # not reached: abort raises

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(PROTECTED_PREFIX):
            return handler
        enter = self._enter

        async def unary(request, context):
            with await enter(context, method):
                return await behavior(request, context)

        async def streaming(request, context):
            with await enter(context, method):
                async for response in behavior(request, context):
                    yield response

        args = (handler.request_deserializer, handler.response_serializer)
        behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary, *args)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(streaming, *args)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(unary, *args)
        return grpc.stream_stream_rpc_method_handler(streaming, *args)


# ------------------------------------------------------------------------------------------------------- HTTP


def http_middleware(access: Access, limits: TenantLimits, metrics: GatewayMetrics):
    """An aiohttp middleware that runs `/v1/...` requests as their tenant: 401 (OpenAI's error body) when it cannot
    name one, 429 with `Retry-After` for a chat completion over its tenant's limits."""

    @web.middleware
    async def tenant_access(request: web.Request, handler):
        if not request.path.startswith("/v1/"):
            return await handler(request)
        tenant = access.identify(request.headers.get("Authorization"))
        if tenant is None:
            return web.json_response(
                {"error": {"message": "missing or invalid bearer token: send 'Authorization: Bearer <token>'",
                           "type": "invalid_request_error", "param": None, "code": "unauthenticated"}},
                status=401, headers={"WWW-Authenticate": 'Bearer realm="internvl"'})
        with tenants.scope(tenant):
            tracing.set_attributes({TENANT_ATTRIBUTE: tenant.name})
            if request.path not in LIMITED_PATHS:
                return await handler(request)
            try:
                admitted = limits.admit(tenant)
            except TenantLimitError as exc:
                metrics.tenant_limited.labels(tenant.name, exc.limit).inc()
                return _refused(request, exc, metrics)
            with admitted:
                return await handler(request)

    return tenant_access


def _refused(request: web.Request, exc: TenantLimitError, metrics: GatewayMetrics) -> web.Response:
    """The 429 of a chat completion over its tenant's limits, recorded like any other chat completion."""
    with metrics.requests.track(RPC, request.headers.get(request_ids.HEADER)) as call:
        request[REQUEST_ID_KEY] = call.request_id
        log.info("%s refused: %s", RPC, exc)
        status, body = error_body(exc, call)
        return web.json_response(body, status=status, headers={"Retry-After": retry_after(exc)})
