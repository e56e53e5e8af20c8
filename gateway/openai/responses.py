"""The answers of the OpenAI-compatible API as pydantic models: what `render` and the handlers send, described for the
OpenAPI document (`gateway.openai.openapi`).

The handlers build their JSON directly (a model per streamed token would cost for nothing); these models say what
that JSON is, closed (`extra="forbid"`: a key the document does not list is a difference), and the tests hold the
two together: the unit tests validate what `render` builds, and the Schemathesis run checks every live response
against the document.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from services.contract.errors import RpcStatus

# OpenAI's finish reasons of ours (`render.FINISH`: a cancelled answer reads "stop").
FinishReason = Literal["stop", "length"]


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorInfo(Closed):
    message: str = Field(description="What is wrong and what to do; never anything internal.")
    type: Literal["invalid_request_error", "server_error"] = Field(
        description="`server_error` for a 5xx status, else `invalid_request_error`.")
    param: None = None
    code: Literal[tuple(status.name.lower() for status in RpcStatus if status is not RpcStatus.OK)] = Field(
        description="The gRPC status of the error, lower-case (the README's error table).")


class ErrorResponse(Closed):
    """OpenAI's error body: every refusal and failure of the API."""

    error: ErrorInfo


class TopLogprob(Closed):
    token: str = Field(description="`token_id:N`: the gateway holds no tokenizer to name the token.")
    token_id: int
    logprob: float
    bytes: None = None


class LogprobEntry(Closed):
    token: str = Field(description="The text of the token's delta (empty when a delta held several tokens).")
    token_id: int
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Closed):
    content: list[LogprobEntry]


class TileUsage(Closed):
    """`usage.internvl`: the token counts again, and the tiles of the request's images and how the cache served them."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    image_tiles: list[int]
    encoded_tiles: int
    reused_tiles: int


class PromptTokensDetails(Closed):
    cached_tokens: int


class CompletionUsage(Closed):
    prompt_tokens: int
    completion_tokens: int = Field(description="Summed over the n answers.")
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    internvl: TileUsage


class AssistantMessage(Closed):
    role: Literal["assistant"]
    content: str


class Choice(Closed):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None


class ChatCompletion(Closed):
    """The response of a chat completion without `stream`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    session_id: str = Field(description="Continues the conversation when sent back as `session_id`.")


class ChunkDelta(Closed):
    role: Literal["assistant"] = Field(None, description="In an answer's first chunk only.")
    content: str = Field(None, description="Absent from an answer's last chunk.")


class ChunkChoice(Closed):
    index: int
    delta: ChunkDelta
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs = Field(None, description="With `logprobs`, in the chunks that carry tokens.")


class ChatCompletionChunk(Closed):
    """One server-sent event of a streamed chat completion (`data: <chunk>`; the stream ends with `data: [DONE]`).
    Each answer starts with a role chunk and ends with a finish chunk (which carries `session_id`); with
    `stream_options.include_usage` a last chunk without choices carries `usage`. A failure after the stream started
    is sent as an event holding an `ErrorResponse`."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    session_id: str = Field(None, description="In each answer's finish chunk.")
    usage: CompletionUsage = Field(None, description="In the last chunk, with `stream_options.include_usage`.")


class ModelCard(Closed):
    id: str = Field(description="What a request's `model` names.")
    object: Literal["model"]
    created: int
    owned_by: str
    root: str = Field(description="The base model's id.")
    parent: str | None = Field(description="The base model's id for a LoRA adapter, null for the base.")


class ModelList(Closed):
    """The base model first, then each LoRA adapter."""

    object: Literal["list"]
    data: list[ModelCard]


class Health(Closed):
    ready: bool = Field(description="Whether the gateway reaches ready vision and LLM services (then 200, else 503).")
