"""The optional bearer token of the gateway's public APIs: a gRPC server interceptor and an aiohttp middleware.

With a token configured (`--api-token-file` or `INTERNVL_API_TOKEN`), every call to `internvl.gateway.v1` must carry
`authorization: Bearer <token>` (gRPC metadata) and every `/v1/...` HTTP request the same `Authorization` header;
anything else is refused before any work, with UNAUTHENTICATED (HTTP 401). Health (`grpc.health.v1`, `/health`),
reflection and `/metrics` stay open for probes and scrapers. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
import logging

import grpc
from aiohttp import web

log = logging.getLogger(__name__)

# The gRPC services the token protects (method names start with "/<service>/").
PROTECTED_PREFIX = "/internvl.gateway."
UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token: send the header 'authorization: Bearer <token>'"


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


def _denied(kind: str):
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    async def streaming(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        yield  # pragma: no cover - makes this an async generator, as a streaming handler must be

    return unary if kind == "unary" else streaming


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to the public services without the right `authorization` metadata."""

    def __init__(self, token: str):
        self.check = TokenCheck(token)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(PROTECTED_PREFIX):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        if self.check.accepts(metadata.get("authorization")):
            return handler
        log.info("refused %s: no valid bearer token", handler_call_details.method)
        args = (handler.request_deserializer, handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_denied("unary"), *args)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_denied("stream"), *args)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(_denied("unary"), *args)
        return grpc.stream_stream_rpc_method_handler(_denied("stream"), *args)


def http_middleware(token: str):
    """An aiohttp middleware answering 401 (OpenAI's error body) to `/v1/...` requests without the token."""
    check = TokenCheck(token)

    @web.middleware
    async def bearer_token(request: web.Request, handler):
        if request.path.startswith("/v1/") and not check.accepts(request.headers.get("Authorization")):
            return web.json_response(
                {"error": {"message": "missing or invalid bearer token: send 'Authorization: Bearer <token>'",
                           "type": "invalid_request_error", "param": None, "code": "unauthenticated"}},
                status=401, headers={"WWW-Authenticate": 'Bearer realm="internvl"'})
        return await handler(request)

    return bearer_token
