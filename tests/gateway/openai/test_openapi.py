"""The OpenAPI document against the application: every route served is documented with its methods and every
documented one served; the request body's schema is the request models' own; a chat completion documents every status
the error table can answer; the document is served, open even where the API needs a token."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.metrics import GatewayMetrics
from gateway.openai import responses
from gateway.openai.app import create_app
from gateway.openai.openapi import REF, document
from gateway.openai.protocol import ChatCompletionRequest
from services.contract.errors import HTTP_BY_CODE

pytestmark = pytest.mark.timeout(60)
# Written out: what a chat completion can answer (the README's error table, the token's 401, a cancellation's 499).
CHAT_STATUSES = {200, 400, 401, 403, 404, 409, 413, 429, 499, 500, 503, 504}


def app(token: str | None = None):
    orchestrator = SimpleNamespace(config=SimpleNamespace(max_media_bytes=1000, api_token=token), model=None)
    return create_app(orchestrator, GatewayMetrics(), lambda: True)


def test_every_route_served_is_documented_and_every_documented_one_served():
    served = {(route.resource.canonical, route.method.lower()) for route in app().router.routes()}
    documented = {(path, method) for path, item in document()["paths"].items() for method in item}
    assert served == documented
    assert ("/v1/chat/completions", "post") in served and ("/health", "head") in served


def test_the_request_schema_is_the_models():
    schema = ChatCompletionRequest.model_json_schema(ref_template=REF)
    components = document()["components"]["schemas"]
    body = document()["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    definitions = schema.pop("$defs")
    assert components["ChatCompletionRequest"] == schema
    for name, definition in definitions.items():
        assert components[name] == definition, name
    # Every field of the request, the refused ones included, is in the document.
    assert set(schema["properties"]) == set(ChatCompletionRequest.model_fields)
    assert schema["properties"]["tools"]["type"] == "null"
    assert schema["additionalProperties"] is False


def test_a_chat_completion_documents_every_status_it_can_answer():
    documented = document()["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {int(status) for status in documented} == CHAT_STATUSES
    assert set(HTTP_BY_CODE.values()) <= CHAT_STATUSES
    for status, response in documented.items():
        schema = response["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/" + ("ChatCompletion" if status == "200" else "ErrorResponse")}
    assert "text/event-stream" in documented["200"]["content"]


def test_the_response_models_are_closed():
    for model in (responses.ChatCompletion, responses.ChatCompletionChunk, responses.ModelList, responses.Health,
                  responses.ErrorResponse):
        assert document()["components"]["schemas"][model.__name__]["additionalProperties"] is False, model


@pytest.mark.asyncio
async def test_served_and_open_without_the_token():
    client = TestClient(TestServer(app(token="secret")))
    await client.start_server()
    try:
        reply = await client.get("/openapi.json")
        assert reply.status == 200 and reply.content_type == "application/json"
        assert json.loads(await reply.read()) == json.loads(json.dumps(document()))
        denied = await client.get("/v1/models")
        assert denied.status == 401
        assert "401" in document()["paths"]["/v1/models"]["get"]["responses"]
        responses.ErrorResponse.model_validate(await denied.json())
    finally:
        await client.close()
