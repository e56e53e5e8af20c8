"""The one place where `internvl.llm.v1` messages become the service's domain objects and back.

Nothing else in services/llm imports the generated stubs, except the servicer that registers them.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import torch
from internvl.common.v1 import common_pb2
from internvl.llm.v1 import llm_pb2

from services.contract.dtypes import DTYPE_FROM_PB, ITEMSIZE
from services.contract.errors import InvalidArgumentError
from services.contract.model_info import ModelInfo
from services.contract.sampling import SamplingParams
from services.llm.engine.events import Event, Finish, TokenDelta
from services.llm.prompt import Conversation, ImagePart, Part, TextPart, Turn, VideoPart
from services.llm.service import GenerateRequest
from services.runtime.embedding_store import tensor_from_bytes

# -- requests ---------------------------------------------------------------------------------------------------


def _image(message: llm_pb2.ImageRef) -> ImagePart:
    return ImagePart(key=message.key, num_tiles=message.num_tiles)


def _parts(messages, where: str) -> tuple[Part, ...]:
    parts: list[Part] = []
    for index, message in enumerate(messages):
        kind = message.WhichOneof("part")
        if kind == "text":
            parts.append(TextPart(message.text))
        elif kind == "image":
            parts.append(_image(message.image))
        elif kind == "video":
            parts.append(VideoPart(tuple(_image(frame) for frame in message.video.frames)))
        else:
            raise InvalidArgumentError(f"{where}[{index}] sets none of text, image, video")
    return tuple(parts)


def generate_request_from_pb(start: llm_pb2.GenerateStart) -> GenerateRequest:
    history = tuple(Turn(_parts(turn.user_parts, f"history[{n}].user_parts"), turn.assistant_text)
                    for n, turn in enumerate(start.history))
    conversation = Conversation(
        user_parts=_parts(start.user_parts, "user_parts"), history=history,
        system_message=start.system_message if start.HasField("system_message") else None)
    return GenerateRequest(conversation, SamplingParams.from_pb(start.sampling), start.inline_embeddings,
                           start.request_id, start.adapter)


async def read_inline_embeddings(messages: AsyncIterator[llm_pb2.GenerateRequest],
                                 max_bytes: int) -> dict[str, torch.Tensor]:
    """Assembles the EmbeddingChunk messages that follow `start` into one tensor per key.

    A malformed chunk fails the call only after the client has half-closed: the rest of its messages are read and
    discarded, so the client sees INVALID_ARGUMENT rather than a broken send.
    """
    assembler = _Assembler(max_bytes)
    error: InvalidArgumentError | None = None
    async for message in messages:
        if error is None:
            try:
                assembler.add(message)
            except InvalidArgumentError as exc:
                error = exc
    if error is not None:
        raise error
    return assembler.tensors()


class _Assembler:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.headers: dict[str, common_pb2.TensorHeader] = {}
        self.buffers: dict[str, bytearray] = {}
        self.total = 0

    def add(self, message: llm_pb2.GenerateRequest) -> None:
        if message.WhichOneof("message") != "embedding":
            raise InvalidArgumentError("only `embedding` messages may follow `start`")
        key, chunk = message.embedding.key, message.embedding.chunk
        if not key:
            raise InvalidArgumentError("an embedding chunk has no key")
        if key not in self.buffers:
            if not chunk.HasField("header") or chunk.offset != 0:
                raise InvalidArgumentError(f"the first chunk of {key} must carry the header, at offset 0")
            header = chunk.header
            if header.dtype not in DTYPE_FROM_PB or len(header.shape) != 2 or any(d < 0 for d in header.shape):
                raise InvalidArgumentError(f"embeddings of {key} must be a 2-D bfloat16, float16 or float32 tensor")
            nbytes = math.prod(header.shape) * ITEMSIZE[DTYPE_FROM_PB[header.dtype]]
            if header.total_bytes != nbytes:
                raise InvalidArgumentError(f"header of {key}: total_bytes {header.total_bytes} != {nbytes}")
            self.total += nbytes
            if self.total > self.max_bytes:
                raise InvalidArgumentError(f"inline embeddings exceed {self.max_bytes} bytes, more than the "
                                           "context holds")
            self.headers[key], self.buffers[key] = header, bytearray()
        elif chunk.HasField("header"):
            raise InvalidArgumentError(f"only the first chunk of {key} may carry a header")
        buffer = self.buffers[key]
        if chunk.offset != len(buffer):
            raise InvalidArgumentError(f"chunk of {key} at offset {chunk.offset}, expected {len(buffer)}")
        if len(buffer) + len(chunk.data) > self.headers[key].total_bytes:
            raise InvalidArgumentError(f"chunks of {key} run past total_bytes {self.headers[key].total_bytes}")
        buffer += chunk.data

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, header in self.headers.items():
            data = self.buffers.pop(key)
            if len(data) != header.total_bytes:
                raise InvalidArgumentError(f"embeddings of {key} are incomplete: {len(data)} of "
                                           f"{header.total_bytes} bytes")
            out[key] = tensor_from_bytes(DTYPE_FROM_PB[header.dtype], list(header.shape), data)
        return out


# -- responses --------------------------------------------------------------------------------------------------


def event_to_pb(event: Event) -> llm_pb2.GenerateResponse:
    if isinstance(event, TokenDelta):
        return llm_pb2.GenerateResponse(delta=llm_pb2.TokenDelta(
            text=event.text, token_ids=event.token_ids,
            top_logprobs=[llm_pb2.TopLogprobs(logprob=t.logprob, token_ids=t.token_ids, logprobs=t.logprobs)
                          for t in event.top_logprobs], index=event.index))
    assert isinstance(event, Finish)
    usage = llm_pb2.Usage(prompt_tokens=event.usage.prompt_tokens, completion_tokens=event.usage.completion_tokens,
                          cached_prompt_tokens=event.usage.cached_prompt_tokens)
    return llm_pb2.GenerateResponse(finish=llm_pb2.GenerateFinish(reason=event.reason.to_pb(llm_pb2.FinishReason),
                                                                  usage=usage, index=event.index))


def model_info_to_pb(info: ModelInfo) -> llm_pb2.GetModelInfoResponse:
    return llm_pb2.GetModelInfoResponse(model_info=info.to_pb())
