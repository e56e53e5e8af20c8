"""The OpenAI-compatible HTTP API, served by aiohttp on the gateway's event loop (beside gRPC).

`POST /v1/chat/completions` (JSON or SSE streaming) and `GET /v1/models`, translated into the same domain request
the gRPC `Chat` takes. Every field of OpenAI's Chat Completions request is either honoured, accepted where its value
asks for nothing (`store: false`, `modalities: ["text"]`, ...), or refused with a 400 naming it (`FIELDS`); an unknown
field is refused too, so nothing a caller asks for is dropped. The README's API section lists them all.

Extensions: `top_k`, `repetition_penalty`, `max_num` (tiles per image), `session_id` (continue a session; every
response carries `session_id`), `multi_image_mode` ("separate" or "combined"), `structured_outputs` (`{"regex": ...}`
or `{"choice": [...]}`, vLLM's names), and the video part:

    {"type": "video", "video": {"url": "data:video/mp4;base64,..." | "https://..." | "path": "clips/a.mp4",
                                "num_segments": 8, "bound": [start_s, end_s], "max_num": 1}}

The gateway holds no tokenizer: a logprob entry's `token` is the text of its delta, and alternatives are named
`token_id:N`; every entry also carries `token_id`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gateway.auth import http_middleware
from gateway.chat_request import (
    CallerTurn,
    ChatRequest,
    ContentPart,
    ImageDetail,
    ImageInput,
    MultiImageMode,
    VideoInput,
)
from gateway.chat_response import Delta, Finish
from gateway.metrics import GatewayMetrics
from gateway.orchestrator import Orchestrator
from services.contract.constraint import Constraint, ConstraintKind
from services.contract.errors import (
    InternVLError,
    InvalidArgumentError,
    RequestTooLargeError,
    RpcStatus,
    http_status,
    rpc_status,
)
from services.contract.sampling import SamplingParams
from services.contract.tiling import DEFAULT_MAX_NUM
from services.runtime import request_ids
from services.runtime.request_metrics import RequestCall

log = logging.getLogger(__name__)
RPC = "openai.chat_completions"
REQUEST_ID_KEY = web.RequestKey("request_id", str)
FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}


# ------------------------------------------------------------------------------------------------- parsing


def _field(body: dict, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise InvalidArgumentError(f"{name} must be a number")
    if not isinstance(value, kind):
        raise InvalidArgumentError(f"{name} has the wrong type ({type(value).__name__})")
    return value


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{name} must be an integer")
    return value


def _float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(f"{name} must be a number")
    try:
        return float(value)
    except OverflowError:
        raise InvalidArgumentError(f"{name} is out of range") from None


def _image(spec: Any, where: str) -> ImageInput:
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise InvalidArgumentError(f"{where}.image_url.url must be a non-empty string")
    raw_detail = spec.get("detail") if isinstance(spec, dict) else None
    try:
        detail = ImageDetail(raw_detail or "auto")
    except ValueError:
        raise InvalidArgumentError(f"{where}.image_url.detail must be 'low', 'high' or 'auto', got "
                                   f"{raw_detail!r}") from None
    if url.lower().startswith(("data:", "http://", "https://")):
        return ImageInput(url=url, detail=detail)
    return ImageInput(path=url, detail=detail)


def _video(spec: Any, where: str) -> VideoInput:
    if not isinstance(spec, dict):
        raise InvalidArgumentError(f"{where}.video must be an object")
    options: dict[str, Any] = {}
    url = spec.get("url")
    if isinstance(url, str) and url.lower().startswith(("data:", "http://", "https://")):
        options["url"] = url  # decoded (or refused) off the event loop, with the images
    elif isinstance(spec.get("path") or url, str):
        options["path"] = spec.get("path") or url
    else:
        raise InvalidArgumentError(f"{where}.video needs a url (a data: or http(s) URL) or a path")
    if spec.get("num_segments") is not None:
        options["num_segments"] = _integer(spec["num_segments"], f"{where}.video.num_segments")
    if spec.get("max_num") is not None:
        options["max_num"] = _integer(spec["max_num"], f"{where}.video.max_num")
    bound = spec.get("bound")
    if bound is not None:
        if not (isinstance(bound, list) and len(bound) == 2):
            raise InvalidArgumentError(f"{where}.video.bound must be [start_seconds, end_seconds]")
        options["bound"] = (_float(bound[0], f"{where}.video.bound"), _float(bound[1], f"{where}.video.bound"))
    return VideoInput(**options)


def _parts(content: Any, where: str) -> list[ContentPart]:
    if isinstance(content, str):
        return [ContentPart(text=content)]
    if not isinstance(content, list):
        raise InvalidArgumentError(f"{where}.content must be a string or a list of parts")
    if not content:
        raise InvalidArgumentError(f"{where}.content is an empty list")
    parts = []
    for i, item in enumerate(content):
        at = f"{where}.content[{i}]"
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text" and isinstance(item.get("text"), str):
            parts.append(ContentPart(text=item["text"]))
        elif kind == "image_url":
            parts.append(ContentPart(image=_image(item.get("image_url"), at)))
        elif kind == "video":
            parts.append(ContentPart(video=_video(item.get("video"), at)))
        else:
            raise InvalidArgumentError(f"{at}: unsupported part type {kind!r} (text, image_url, video)")
    return parts


def _text(content: Any, where: str) -> str:
    parts = _parts(content, where)
    if any(p.text is None for p in parts):
        raise InvalidArgumentError(f"{where}: only text is allowed here")
    return "".join(p.text for p in parts)


# Every field of a Chat Completions request: True where this API honours it (or its extensions), otherwise why it is
# refused. Fields whose value can ask for nothing (`store: false`) are accepted with that value only (`_check_fields`).
FIELDS: dict[str, bool | str] = {
    **dict.fromkeys(("messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop",
                     "seed", "logprobs", "top_logprobs", "stream", "stream_options", "presence_penalty",
                     "frequency_penalty", "logit_bias", "response_format", "user", "safety_identifier", "store",
                     "service_tier", "modalities", "parallel_tool_calls",
                     # extensions
                     "top_k", "repetition_penalty", "max_num", "session_id", "multi_image_mode",
                     "structured_outputs"), True),
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "InternVL 2.5 is not a reasoning model",
    "verbosity": "verbosity is not supported",
    "web_search_options": "web search is not supported",
    "metadata": "stored completions are not supported (metadata needs store)",
    "prompt_cache_key": "the prefix cache is keyed by content; a prompt_cache_key has no effect here",
    "prompt_cache_retention": "the prefix cache is keyed by content; its retention is the server's",
    "prompt_cache_options": "the prefix cache is keyed by content; its options are the server's",
    "moderation": "moderation is not part of this server",
}
# Message fields beside role and content.
MESSAGE_FIELDS_REFUSED = {
    "name": "participant names are not part of the internvl2_5 template",
    "tool_calls": "tool calling is not supported",
    "tool_call_id": "tool calling is not supported",
    "function_call": "function calling is not supported",
    "audio": "audio is not supported",
    "refusal": "assistant refusals cannot be replayed",
}


def _check_fields(body: dict) -> None:
    for name, value in body.items():
        rule = FIELDS.get(name)
        if rule is None:
            raise InvalidArgumentError(f"unknown field {name!r}; this API's fields are listed in the README")
        if rule is not True and value is not None:
            raise InvalidArgumentError(f"{name} is not supported: {rule}")
    if body.get("store") not in (None, False):
        raise InvalidArgumentError("store is not supported: completions are not stored (omit it or send false)")
    if body.get("service_tier") not in (None, "auto", "default"):
        raise InvalidArgumentError("service_tier: this server has one tier ('auto' or 'default')")
    if body.get("modalities") not in (None, ["text"]):
        raise InvalidArgumentError("modalities: only [\"text\"] output is supported")
    options = _field(body, "stream_options", dict, {})
    for name in options:
        if name not in ("include_usage", "include_obfuscation"):
            raise InvalidArgumentError(f"stream_options.{name} is not supported")
    if options.get("include_obfuscation"):
        raise InvalidArgumentError("stream_options.include_obfuscation is not supported")


def _logit_bias(raw: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} object, as (id, bias) pairs in token order."""
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise InvalidArgumentError("logit_bias must be an object mapping token ids to biases")
    pairs = []
    for key, value in raw.items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidArgumentError(f"logit_bias: {key!r} is not a token id") from None
        pairs.append((token, _float(value, f"logit_bias[{key}]")))
    return tuple(sorted(pairs))


def _constraint(body: dict) -> Constraint | None:
    """`response_format` (text, json_object, json_schema) or the `structured_outputs` extension (regex, choice)."""
    fmt = _field(body, "response_format", dict, None)
    extension = _field(body, "structured_outputs", dict, None)
    kind = fmt.get("type") if fmt is not None else None
    if kind not in (None, "text", "json_object", "json_schema"):
        raise InvalidArgumentError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got "
                                   f"{kind!r}")
    if extension is not None and kind not in (None, "text"):
        raise InvalidArgumentError("send either response_format or structured_outputs, not both")
    if kind == "json_object":
        return Constraint(ConstraintKind.JSON_OBJECT)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), (dict, bool)):
            raise InvalidArgumentError("response_format.json_schema must be an object with a `schema` object")
        unknown = set(spec) - {"name", "description", "schema", "strict"}
        if unknown:
            raise InvalidArgumentError(f"response_format.json_schema: unknown field {min(unknown)!r}")
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise InvalidArgumentError("response_format.json_schema.strict must be a boolean")
        return Constraint(ConstraintKind.JSON_SCHEMA, schema=json.dumps(spec["schema"]), strict=bool(strict))
    if extension is None:
        return None
    if len(extension) != 1 or next(iter(extension)) not in ("regex", "choice"):
        raise InvalidArgumentError("structured_outputs must have exactly one of 'regex' (a string) or 'choice' "
                                   "(a list of strings)")
    if "regex" in extension:
        if not isinstance(extension["regex"], str):
            raise InvalidArgumentError("structured_outputs.regex must be a string")
        return Constraint(ConstraintKind.REGEX, pattern=extension["regex"])
    choices = extension["choice"]
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise InvalidArgumentError("structured_outputs.choice must be a list of strings")
    return Constraint(ConstraintKind.CHOICE, choices=tuple(choices))


def parse_request(body: Any) -> tuple[ChatRequest, bool, bool, int]:
    """(request, stream, include_usage, top_logprobs to report) from a chat completions body."""
    if not isinstance(body, dict):
        raise InvalidArgumentError("the body must be a JSON object")
    _check_fields(body)
    messages = _field(body, "messages", list)
    if not messages:
        raise InvalidArgumentError("messages must be a non-empty list")
    system: list[str] = []
    turns: list[CallerTurn] = []
    pending: list[ContentPart] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        for name, reason in MESSAGE_FIELDS_REFUSED.items():
            if isinstance(message, dict) and message.get(name) is not None:
                raise InvalidArgumentError(f"{where}.{name} is not supported: {reason}")
        if role in ("system", "developer"):
            system.append(_text(message.get("content"), where))
        elif role == "user":
            pending += _parts(message.get("content"), where)
        elif role == "assistant":
            if not pending:
                raise InvalidArgumentError(f"{where}: an assistant message must follow a user message")
            turns.append(CallerTurn(tuple(pending), _text(message.get("content") or "", where)))
            pending = []
        else:
            raise InvalidArgumentError(f"{where}: unsupported role {role!r} (system, user, assistant)")
    if not pending:
        raise InvalidArgumentError("the last message must be a user message")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, (str, list)):
        raise InvalidArgumentError("stop must be a string or a list of strings")
    stop_strings = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(s, str) for s in stop_strings):
        raise InvalidArgumentError("stop must be a string or a list of strings")
    want_logprobs = bool(_field(body, "logprobs", bool, False))
    top = _field(body, "top_logprobs", int, 0)
    if top and not want_logprobs:
        raise InvalidArgumentError("top_logprobs requires logprobs = true")
    mode = _field(body, "multi_image_mode", str, "separate")
    if mode not in ("separate", "combined"):
        raise InvalidArgumentError("multi_image_mode must be 'separate' or 'combined'")
    sampling = SamplingParams(
        max_new_tokens=_field(body, "max_completion_tokens", int, None) or _field(body, "max_tokens", int, 0),
        temperature=_float(_field(body, "temperature", (int, float), 1.0), "temperature"),
        top_p=_float(_field(body, "top_p", (int, float), 1.0), "top_p"),
        top_k=_field(body, "top_k", int, 0),
        repetition_penalty=_float(_field(body, "repetition_penalty", (int, float), 0.0), "repetition_penalty"),
        stop_strings=stop_strings, seed=_field(body, "seed", int, None),
        # The LLM service reports a token's own logprob only alongside alternatives: ask for at least one.
        top_logprobs=max(top, 1) if want_logprobs else 0,
        presence_penalty=_float(_field(body, "presence_penalty", (int, float), 0.0), "presence_penalty"),
        frequency_penalty=_float(_field(body, "frequency_penalty", (int, float), 0.0), "frequency_penalty"),
        logit_bias=_logit_bias(body.get("logit_bias")), n=_field(body, "n", int, 1), constraint=_constraint(body))
    if sampling.n < 1:
        raise InvalidArgumentError(f"n must be >= 1, got {sampling.n}")
    request = ChatRequest(
        content=tuple(pending), history=tuple(turns), session_id=_field(body, "session_id", str, None),
        max_num=_field(body, "max_num", int, DEFAULT_MAX_NUM), multi_image_mode=MultiImageMode(mode), sampling=sampling,
        system_message="\n".join(system) if system else None,
        user=_field(body, "user", str, None) or _field(body, "safety_identifier", str, ""),
        model=_field(body, "model", str, ""))
    stream = bool(_field(body, "stream", bool, False))
    include_usage = bool((_field(body, "stream_options", dict, {}) or {}).get("include_usage", False))
    return request, stream, include_usage, top if want_logprobs else -1


# ------------------------------------------------------------------------------------------------ rendering


def _usage(finishes: list[Finish]) -> dict:
    """OpenAI's usage of n answers: the prompt once, the completion tokens of every answer summed."""
    u = dataclasses.replace(finishes[0].usage, completion_tokens=sum(f.usage.completion_tokens for f in finishes))
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens}, "internvl": u.as_dict()}


def _logprobs(delta: Delta, top: int) -> list[dict]:
    entries = []
    for lp in delta.logprobs:
        text = delta.text if len(delta.token_ids) == 1 else ""
        entries.append({"token": text, "token_id": lp.token_id, "logprob": lp.logprob,
                        "bytes": list(text.encode()),
                        "top_logprobs": [{"token": f"token_id:{t}", "token_id": t, "logprob": v, "bytes": None}
                                         for t, v in lp.top[:top]]})
    return entries


def error_body(exc: BaseException, call: RequestCall | None = None) -> tuple[int, dict]:
    """HTTP status and OpenAI error body (and the status `call` is counted under), both from the one error table;
    unexpected errors are logged with their traceback, never returned."""
    if not isinstance(exc, InternVLError):
        log.error("chat completion failed", exc_info=exc)
    status = rpc_status(exc).name
    if call is not None:
        call.code = status
    message = str(exc) if isinstance(exc, InternVLError) else "internal error"
    code = http_status(exc)
    kind = "invalid_request_error" if code < 500 else "server_error"
    return code, {"error": {"message": message, "type": kind, "param": None, "code": status.lower()}}


# ---------------------------------------------------------------------------------------------------- app


class OpenAIHandlers:
    def __init__(self, orchestrator: Orchestrator, metrics: GatewayMetrics, is_ready: Callable[[], bool]):
        self.orchestrator = orchestrator
        self.metrics = metrics
        self.is_ready = is_ready

    @property
    def model_name(self) -> str:
        model = self.orchestrator.model
        return model.model_name if model is not None else "internvl"

    async def models(self, request: web.Request) -> web.Response:
        """The base model, then each LoRA adapter with the base as its `parent` (vLLM's field)."""
        base = self.model_name
        served = self.orchestrator.served_models() if self.orchestrator.model is not None else [(base, None)]
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "internvl-serve", "root": base,
             "parent": base if adapter is not None else None}
            for name, adapter in served]})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"ready": self.is_ready()}, status=200 if self.is_ready() else 503)

    async def chat_completions(self, http: web.Request) -> web.StreamResponse:
        # Recorded like a gRPC call (same families, method `openai.chat_completions`); a disconnect cancels it.
        with self.metrics.requests.track(RPC, http.headers.get(request_ids.HEADER)) as call:
            http[REQUEST_ID_KEY] = call.request_id  # echoed by _echo_request_id
            return await self._chat_completions(http, call)

    async def _chat_completions(self, http: web.Request, call: RequestCall) -> web.StreamResponse:
        events = self.metrics.track_tokens(RPC, self._events(http, call.request_id))
        async with contextlib.aclosing(events):
            try:
                options = await anext(events)
                first = await anext(events)
            except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error body
                status, body = error_body(exc, call)
                return web.json_response(body, status=status)
            model, stream, include_usage, top, answers = options
            ident, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
            if stream:
                return await self._stream(http, call, events, first, ident, created, model, include_usage, top,
                                          answers)
            received = [first]
            try:
                async for event in events:
                    received.append(event)
            except Exception as exc:  # noqa: BLE001
                status, body = error_body(exc, call)
                return web.json_response(body, status=status)
            finishes = sorted((e for e in received if isinstance(e, Finish)), key=lambda f: f.index)
            choices = []
            for finish in finishes:
                deltas = [e for e in received if isinstance(e, Delta) and e.index == finish.index]
                logprobs = {"content": [e for d in deltas for e in _logprobs(d, top)]} if top >= 0 else None
                choices.append({"index": finish.index,
                                "message": {"role": "assistant", "content": "".join(d.text for d in deltas)},
                                "finish_reason": FINISH[finish.reason.value], "logprobs": logprobs})
            return web.json_response({"id": ident, "object": "chat.completion", "created": created, "model": model,
                                      "choices": choices, "usage": _usage(finishes),
                                      "session_id": finishes[0].session_id})

    async def _events(self, http: web.Request, request_id: str):
        """The parsed options, then the orchestrator's events (failures, parsing included, are tracked)."""
        try:
            body = await http.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InvalidArgumentError("the body is not valid JSON") from None
        except web.HTTPRequestEntityTooLarge:
            raise RequestTooLargeError(f"the request body is larger than the limit of "
                                       f"{max_body_bytes(self.orchestrator.config)} bytes; send smaller media "
                                       "(the gateway's --max-media-bytes sets it)") from None
        request, stream, include_usage, top = parse_request(body)
        request = dataclasses.replace(request, request_id=request_id)
        model = body.get("model") if isinstance(body.get("model"), str) else self.model_name
        yield (model, stream, include_usage, top, request.sampling.answers)
        async with contextlib.aclosing(self.orchestrator.chat(request)) as events:
            async for event in events:
                yield event

    async def _stream(self, http: web.Request, call: RequestCall, events, first, ident: str, created: int,
                      model: str, include_usage: bool, top: int, answers: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(http)

        async def send(payload: dict | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
            await response.write(f"data: {data}\n\n".encode())

        def chunk(index: int, delta: dict, finish_reason: str | None = None, **extra) -> dict:
            return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, **extra}]}

        for index in range(answers):
            await send(chunk(index, {"role": "assistant", "content": ""}))
        event, finishes = first, []
        try:
            while True:
                if isinstance(event, Finish):
                    finishes.append(event)
                    await send({**chunk(event.index, {}, FINISH[event.reason.value]), "session_id": event.session_id})
                    if len(finishes) == answers:
                        if include_usage:
                            await send({"id": ident, "object": "chat.completion.chunk", "created": created,
                                        "model": model, "choices": [], "usage": _usage(finishes)})
                        break
                else:
                    extra = {"logprobs": {"content": _logprobs(event, top)}} if top >= 0 else {}
                    await send(chunk(event.index, {"content": event.text}, **extra))
                event = await anext(events)
        except (ConnectionResetError, ConnectionError):
            call.code = RpcStatus.CANCELLED.name
            return response  # the client went away; closing `events` cancels the services' calls
        except Exception as exc:  # noqa: BLE001 - a stream fails with an error event
            _, body = error_body(exc, call)
            await send(body)
        await send("[DONE]")
        await response.write_eof()
        return response


async def _echo_request_id(http: web.Request, response: web.StreamResponse) -> None:
    """Every chat completion's response, errors and streams included, carries its request id."""
    if REQUEST_ID_KEY in http:
        response.headers[request_ids.HEADER] = http[REQUEST_ID_KEY]


def max_body_bytes(config) -> int:
    """The largest HTTP request body read: room for one medium at the limit, base64-encoded (4/3), and the rest."""
    return config.max_media_bytes * 2


def create_app(orchestrator: Orchestrator, metrics: GatewayMetrics, is_ready: Callable[[], bool]) -> web.Application:
    handlers = OpenAIHandlers(orchestrator, metrics, is_ready)
    token = orchestrator.config.api_token
    # With tracing on, OpenTelemetry's instrumentation puts its middleware first (services.runtime.tracing).
    app = web.Application(client_max_size=max_body_bytes(orchestrator.config),
                          middlewares=[http_middleware(token)] if token else [])
    app.on_response_prepare.append(_echo_request_id)
    app.router.add_post("/v1/chat/completions", handlers.chat_completions)
    app.router.add_get("/v1/models", handlers.models)
    app.router.add_get("/health", handlers.health)
    return app
