"""The body of `POST /v1/chat/completions` as pydantic models, its translation into the domain's `ChatRequest`, and
the one place a validation error becomes the API's refusal (`parse`, `invalid_argument`).

Every field of OpenAI's Chat Completions request is declared on `ChatCompletionRequest`: honoured (or one of our
extensions), accepted only with a value that asks for nothing (`Only`: `store: false`, `modalities: ["text"]`, ...),
or refused naming it and why (`Refused`); an unknown field is refused too (`extra="forbid"`), so nothing a caller asks
for is dropped. The README's API section lists them all. The models are strict (`"5"` is not a number) and null means
"not given", as the openai client sends it. Messages and their parts: `gateway.openai.messages`.

Extensions: `top_k`, `repetition_penalty`, `max_num` (tiles per image), `session_id` (continue a session; every
response carries `session_id`), `multi_image_mode` ("separate" or "combined"), `structured_outputs` (`{"regex": ...}`
or `{"choice": [...]}`, vLLM's names), and the video part.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import ErrorDetails

from gateway.chat_request import CallerTurn, ChatRequest, ContentPart, MultiImageMode
from gateway.openai.fields import MESSAGE, NOT_TAKEN, PROBLEM, Model, Number, Only, Refused, problem, to_float
from gateway.openai.messages import UNSUPPORTED_PART, Message
from services.contract.constraint import Constraint, ConstraintKind
from services.contract.errors import InvalidArgumentError
from services.contract.sampling import SamplingParams
from services.contract.tiling import DEFAULT_MAX_NUM


def _not_empty(messages: Any) -> Any:
    if messages is None or messages == []:
        raise problem(" must be a non-empty list")
    return messages


def _answers_follow_questions(messages: list[Message]) -> list[Message]:
    asked = False  # a user message since the last assistant message
    for index, message in enumerate(messages):
        if message.role == "assistant":
            if not asked:
                raise problem(f"[{index}]: an assistant message must follow a user message")
            asked = False
        asked = asked or message.role == "user"
    if not asked:
        raise problem("the last message must be a user message", MESSAGE)
    return messages


def _stop(value: Any) -> tuple[str, ...]:
    strings = [value] if isinstance(value, str) else value
    if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
        raise problem(" must be a string or a list of strings")
    return tuple(strings)


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} object, as (id, bias) pairs in token order."""
    if not isinstance(value, dict):
        raise problem(" must be an object mapping token ids to biases")
    pairs = []
    for key, bias in value.items():
        try:
            token = int(key)
        except ValueError:
            raise problem(f": {key!r} is not a token id") from None
        pairs.append((token, to_float(bias, f"[{key}]")))
    return tuple(sorted(pairs))


def _image_mode(mode: str) -> str:
    if mode not in ("separate", "combined"):
        raise problem(" must be 'separate' or 'combined'")
    return mode


def _at_least_one(n: int) -> int:
    if n < 1:
        raise problem(f" must be >= 1, got {n}")
    return n


def _falsy(value: Any) -> Any:
    if value:
        raise problem(" is not supported")
    return value


class StreamOptions(Model):
    model_config = ConfigDict(extra="forbid")

    include_usage: Any = None
    include_obfuscation: Annotated[Any, AfterValidator(_falsy)] = None


# `response_format.json_schema`, as the JSON Schema of the API's document says it (the model reads it by hand).
JSON_SCHEMA_FORMAT = {"type": "object", "required": ["schema"], "additionalProperties": False, "properties": {
    "name": {"type": "string"}, "description": {"type": "string"}, "schema": {"type": ["object", "boolean"]},
    "strict": {"type": ["boolean", "null"]}}}
# A `logit_bias` key: a token id of the model's tokenizer.
TOKEN_ID = r"^[0-9]+$"


def _format_type(kind: Any) -> str | None:
    if kind not in (None, "text", "json_object", "json_schema"):
        raise problem(f" must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    return kind


class ResponseFormat(Model):
    """OpenAI's `response_format`: `text`, `json_object`, or `json_schema` with its `json_schema` object (`name`,
    `description`, `schema`, `strict`)."""

    type: Annotated[str | None, PlainValidator(
        _format_type, json_schema_input_type=Literal["text", "json_object", "json_schema"] | None)] = None
    json_schema: Annotated[Any, WithJsonSchema(JSON_SCHEMA_FORMAT)] = None  # read only for its type

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        spec = self.json_schema
        if self.type != "json_schema":
            return self
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict | bool):
            raise problem(".json_schema must be an object with a `schema` object")
        unknown = set(spec) - {"name", "description", "schema", "strict"}
        if unknown:
            raise problem(f".json_schema: unknown field {min(unknown)!r}")
        if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
            raise problem(".json_schema.strict must be a boolean")
        return self

    def constraint(self) -> Constraint | None:
        if self.type == "json_object":
            return Constraint(ConstraintKind.JSON_OBJECT)
        if self.type == "json_schema":
            return Constraint(ConstraintKind.JSON_SCHEMA, schema=json.dumps(self.json_schema["schema"]),
                              strict=bool(self.json_schema.get("strict")))
        return None


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise problem(" must be a string")
    return value


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise problem(" must be a list of strings")
    return tuple(value)


class StructuredOutputs(Model):
    """vLLM's `structured_outputs` extension: exactly one of `regex` (the whole answer matches it) or `choice`."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1, "maxProperties": 1})

    regex: Annotated[str | None, PlainValidator(_string, json_schema_input_type=str)] = None
    choice: Annotated[tuple[str, ...] | None, PlainValidator(_strings, json_schema_input_type=list[str])] = None

    @model_validator(mode="before")
    @classmethod
    def _exactly_one(cls, value: Any) -> Any:
        if isinstance(value, dict) and (len(value) != 1 or next(iter(value)) not in ("regex", "choice")):
            raise problem(" must have exactly one of 'regex' (a string) or 'choice' (a list of strings)")
        return value

    def constraint(self) -> Constraint:
        if self.regex is not None:
            return Constraint(ConstraintKind.REGEX, pattern=self.regex)
        return Constraint(ConstraintKind.CHOICE, choices=self.choice)


class ChatCompletionRequest(Model):
    """The body of `POST /v1/chat/completions`. Fields are declared in the order they are checked: the first problem
    is the one reported (`invalid_argument`)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"required": ["messages"]})

    # Accepted only with a value that asks for nothing.
    store: Annotated[Any, Only(False, refusal=" is not supported: completions are not stored (omit it or send "
                                              "false)")] = None
    service_tier: Annotated[Any, Only("auto", "default", refusal=": this server has one tier ('auto' or "
                                                                 "'default')")] = None
    modalities: Annotated[Any, Only(["text"], refusal=': only ["text"] output is supported')] = None
    stream_options: StreamOptions | None = None  # `include_usage`; `include_obfuscation: true` is refused
    # Honoured, and our extensions.
    messages: Annotated[list[Message], BeforeValidator(_not_empty), AfterValidator(_answers_follow_questions)] = (
        Field(None, validate_default=True, json_schema_extra={"minItems": 1}))
    stop: Annotated[tuple[str, ...], PlainValidator(_stop, json_schema_input_type=str | list[str])] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    multi_image_mode: Annotated[str, AfterValidator(_image_mode),
                                WithJsonSchema({"enum": ["separate", "combined"]})] | None = None
    max_completion_tokens: int | None = None  # wins over max_tokens
    max_tokens: int | None = None
    temperature: Number | None = None  # OpenAI's default: 1
    top_p: Number | None = None
    top_k: int | None = None
    repetition_penalty: Number | None = None
    seed: int | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: Annotated[tuple[tuple[int, float], ...], PlainValidator(
        _logit_bias, json_schema_input_type=dict[Annotated[str, Field(pattern=TOKEN_ID)], float])] | None = None
    n: Annotated[int, AfterValidator(_at_least_one), WithJsonSchema({"type": "integer", "minimum": 1})] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    session_id: str | None = None
    max_num: int | None = None
    user: str | None = None  # recorded as `user.id` on the request's span, as is safety_identifier
    safety_identifier: str | None = None
    model: str | None = None
    stream: bool | None = None
    parallel_tool_calls: Any = None  # no tools can be given, so there is nothing for it to do
    # Refused (reported before any other problem).
    tools: Annotated[Any, Refused("tool calling is not supported")] = None
    tool_choice: Annotated[Any, Refused("tool calling is not supported")] = None
    functions: Annotated[Any, Refused("function calling is not supported")] = None
    function_call: Annotated[Any, Refused("function calling is not supported")] = None
    audio: Annotated[Any, Refused("audio output is not supported")] = None
    prediction: Annotated[Any, Refused("predicted outputs are not supported")] = None
    reasoning_effort: Annotated[Any, Refused("InternVL 2.5 is not a reasoning model")] = None
    verbosity: Annotated[Any, Refused("verbosity is not supported")] = None
    web_search_options: Annotated[Any, Refused("web search is not supported")] = None
    metadata: Annotated[Any, Refused("stored completions are not supported (metadata needs store)")] = None
    prompt_cache_key: Annotated[Any, Refused("the prefix cache is keyed by content; a prompt_cache_key has no "
                                             "effect here")] = None
    prompt_cache_retention: Annotated[Any, Refused("the prefix cache is keyed by content; its retention is the "
                                                   "server's")] = None
    prompt_cache_options: Annotated[Any, Refused("the prefix cache is keyed by content; its options are the "
                                                 "server's")] = None
    moderation: Annotated[Any, Refused("moderation is not part of this server")] = None

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise problem("top_logprobs requires logprobs = true", MESSAGE)
        if self.structured_outputs is not None and self.response_format is not None and \
                self.response_format.type not in (None, "text"):
            raise problem("send either response_format or structured_outputs, not both", MESSAGE)
        return self

    @classmethod
    def refused(cls) -> dict[str, str]:
        """The fields refused unless null, with the reason."""
        return {name: m.reason for name, field in cls.model_fields.items() for m in field.metadata
                if isinstance(m, Refused)}

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a chunk of usage."""
        return bool(self.stream_options is not None and self.stream_options.include_usage)

    @property
    def reported_top_logprobs(self) -> int | None:
        """Alternatives per logprob entry in the response; None: no logprobs at all."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat_request(self, request_id: str = "") -> ChatRequest:
        """The domain request: system messages joined, each user turn and its answer as history, the user parts
        since the last answer as the content."""
        system: list[str] = []
        turns: list[CallerTurn] = []
        asked: list[ContentPart] = []  # the user parts since the last assistant message
        for message in self.messages:
            if message.role == "user":
                asked += message.parts()
            elif message.role == "assistant":
                turns.append(CallerTurn(tuple(asked), message.text()))
                asked = []
            else:
                system.append(message.text())
        return ChatRequest(
            content=tuple(asked), history=tuple(turns), session_id=self.session_id,
            max_num=DEFAULT_MAX_NUM if self.max_num is None else self.max_num,
            multi_image_mode=MultiImageMode(self.multi_image_mode or "separate"), sampling=self.sampling(),
            system_message="\n".join(system) if system else None, request_id=request_id,
            user=self.user or self.safety_identifier or "", model=self.model or "")

    def sampling(self) -> SamplingParams:
        """The sampling asked for, OpenAI's defaults where not given (checked by the orchestrator next)."""
        top = self.reported_top_logprobs
        structured = self.structured_outputs.constraint() if self.structured_outputs is not None else None
        return SamplingParams(
            max_new_tokens=self.max_completion_tokens or self.max_tokens or 0,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
            repetition_penalty=self.repetition_penalty or 0.0, stop_strings=self.stop or (), seed=self.seed,
            # The LLM service reports a token's own logprob only alongside alternatives: ask for at least one.
            top_logprobs=0 if top is None else max(top, 1),
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=self.logit_bias or (), n=1 if self.n is None else self.n,
            constraint=(self.response_format.constraint() if self.response_format is not None else None) or structured)


def parse(body: Any) -> ChatCompletionRequest:
    """The validated request, or the API's refusal of it (`InvalidArgumentError`: 400) naming its first problem."""
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise invalid_argument(exc, list(body) if isinstance(body, dict) else []) from None


def invalid_argument(error: ValidationError, fields: list[str]) -> InvalidArgumentError:
    """The refusal of a body (its `fields` in order) that failed validation: its first problem, a field this API does
    not take (unknown, or refused) before any other, in the body's order."""

    def rank(problem: ErrorDetails) -> tuple[int, int]:
        loc = problem["loc"]
        if problem["type"] in ("extra_forbidden", NOT_TAKEN) and len(loc) == 1:
            return 0, fields.index(loc[0])
        return 1, 0

    return InvalidArgumentError(message(min(error.errors(include_url=False), key=rank)))


def message(problem: ErrorDetails) -> str:
    """One problem as the API words it: our own problems read after their path; pydantic's type errors name the
    type that came."""
    kind, loc, value = problem["type"], problem["loc"], problem.get("input")
    where = path(loc)
    if kind in (PROBLEM, NOT_TAKEN):
        return where + problem["ctx"]["text"]
    if kind == MESSAGE:
        return problem["ctx"]["text"]
    if kind == UNSUPPORTED_PART:
        part_type = value.get("type") if isinstance(value, dict) else None
        return f"{where}: unsupported part type {part_type!r} (text, image_url, video)"
    if kind == "extra_forbidden":
        return f"unknown field {loc[0]!r}; this API's fields are listed in the README" if len(loc) == 1 else \
            f"{where} is not supported"
    if not loc:
        return "the body must be a JSON object"
    if isinstance(value, bool) and kind in ("int_type", "float_type"):
        return f"{where} must be a number"
    if kind.endswith("_type"):
        return f"{where} has the wrong type ({type(value).__name__})"
    return f"{where}: {problem['msg']}"


def path(loc: tuple[int | str, ...]) -> str:
    """A location as the API names it: `messages[0].content[1].image_url.url` (a part's union tag, which pydantic
    puts after the part's index, left out)."""
    text = ""
    for i, key in enumerate(loc):
        if isinstance(key, int):
            text += f"[{key}]"
        elif not (i >= 2 and loc[i - 2] == "content" and isinstance(loc[i - 1], int)):
            text += f".{key}" if text else key
    return text
