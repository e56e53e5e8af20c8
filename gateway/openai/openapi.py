"""The OpenAPI 3.1 document of the OpenAI-compatible API, served at `GET /openapi.json`.

Generated, so it cannot drift: the request body's schema is the request models' own (`protocol`, `messages`), the
responses' the response models' (`responses`), and the error statuses of a chat completion are those the one error
table maps to (`services.contract.errors`), with the bearer token's 401 and a cancelled request's 499. The tests
check it against the application's routes, and Schemathesis checks the live API against it.
"""

from __future__ import annotations

import functools
import json
from collections import defaultdict

from pydantic.json_schema import models_json_schema

from gateway.openai import responses
from gateway.openai.protocol import ChatCompletionRequest
from services.contract.errors import HTTP_BY_CODE, HTTP_BY_STATUS, STATUS_BY_CODE, ErrorCode, RpcStatus

TITLE = "internvl-serve OpenAI-compatible API"
VERSION = "1"
REF = "#/components/schemas/{model}"
MODELS = (ChatCompletionRequest, responses.ChatCompletion, responses.ChatCompletionChunk, responses.ModelList,
          responses.Health, responses.ErrorResponse)
# What an HTTP status means beside the error codes that map to it (none map to these two).
UNAUTHENTICATED = HTTP_BY_STATUS[RpcStatus.UNAUTHENTICATED]
CANCELLED = HTTP_BY_STATUS[RpcStatus.CANCELLED]
_EXTRA_MEANINGS = {UNAUTHENTICATED: "The gateway requires a bearer token and the request had none, or the wrong one.",
                   CANCELLED: "The client went away before the answer (recorded, never read by anyone)."}


def schema_ref(model) -> dict:
    return {"$ref": REF.format(model=model.__name__)}


def components() -> dict:
    """Every model's JSON Schema, the models they refer to included, by name."""
    _, top = models_json_schema([(model, "validation") for model in MODELS], ref_template=REF)
    return top["$defs"]


def error_statuses() -> dict[int, str]:
    """Each HTTP status a chat completion can fail with, and what it means: the error codes (and gRPC statuses) that
    map to it."""
    codes: dict[int, list[ErrorCode]] = defaultdict(list)
    for code in ErrorCode:
        codes[HTTP_BY_CODE[code]].append(code)
    meanings = {status: "Error codes " + ", ".join(c.name for c in group) + " (gRPC "
                + ", ".join(dict.fromkeys(STATUS_BY_CODE[c].name for c in group)) + ")."
                for status, group in codes.items()}
    return dict(sorted({**meanings, **_EXTRA_MEANINGS}.items()))


def _error(description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": schema_ref(responses.ErrorResponse)}}}


def _json(model, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema_ref(model)}}}


def _with_head(get: dict) -> dict:
    """aiohttp answers HEAD wherever it answers GET: the same statuses, no body."""
    head = {"operationId": get["operationId"] + "Head", "summary": get["summary"] + " (headers only)",
            "responses": {status: {"description": r["description"]} for status, r in get["responses"].items()}}
    if "security" in get:
        head["security"] = get["security"]
    return {"get": get, "head": head}


# A deployment with a token or API keys (`--api-token-file`, `--api-keys-file`) requires one on /v1/... paths;
# without either they are open.
_TOKEN = [{"bearerAuth": []}, {}]
_UNAUTHENTICATED = {str(UNAUTHENTICATED): _error(_EXTRA_MEANINGS[UNAUTHENTICATED])}


def _chat_completions() -> dict:
    ok = {"description": "The answer: one JSON response, or with `stream` server-sent events, each "
                         "`data: <ChatCompletionChunk>`, ended by `data: [DONE]`.",
          "content": {"application/json": {"schema": schema_ref(responses.ChatCompletion)},
                      "text/event-stream": {"schema": {"type": "string"}}}}
    errors = {str(status): _error(meaning) for status, meaning in error_statuses().items()}
    errors["429"]["headers"] = {"Retry-After": {
        "description": "Whole seconds after which a retry may succeed; sent when the caller's tenant is over its rate "
                       "or concurrency limit.", "schema": {"type": "integer", "minimum": 1}}}
    return {"post": {
        "operationId": "createChatCompletion", "summary": "A chat completion (InternVL 2.5: text, images, video)",
        "description": "Every field of OpenAI's request is honoured, accepted only with a value that asks for nothing, "
                       "or refused with 400 naming it; an unknown field is refused too. The README lists them.",
        "security": _TOKEN,
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": schema_ref(ChatCompletionRequest)}}},
        "responses": {"200": ok, **errors}}}


def _paths() -> dict:
    return {
        "/v1/chat/completions": _chat_completions(),
        "/v1/models": _with_head({
            "operationId": "listModels", "summary": "The model ids a request's `model` may name", "security": _TOKEN,
            "responses": {"200": _json(responses.ModelList, "The base model, then each LoRA adapter."),
                          **_UNAUTHENTICATED}}),
        "/health": _with_head({
            "operationId": "health", "summary": "Readiness (open without the token)",
            "responses": {"200": _json(responses.Health, "Ready."),
                          "503": _json(responses.Health, "Not ready: a service is unreachable or loading.")}}),
        "/openapi.json": _with_head({
            "operationId": "openapi", "summary": "This document (open without the token)",
            "responses": {"200": {"description": "The OpenAPI document.",
                                  "content": {"application/json": {"schema": {"type": "object"}}}}}}),
    }


@functools.cache
def document() -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": TITLE, "version": VERSION,
                 "description": "The gateway's OpenAI-compatible HTTP API. Errors have OpenAI's body "
                                "(`ErrorResponse`), their statuses from the one error table (README: Errors)."},
        "paths": _paths(),
        "components": {"schemas": components(),
                       "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}}},
    }


@functools.cache
def document_bytes() -> bytes:
    return json.dumps(document()).encode()

