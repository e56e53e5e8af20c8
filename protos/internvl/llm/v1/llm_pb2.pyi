from internvl.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("start", "embedding")
    START_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    start: GenerateStart
    embedding: EmbeddingChunk
    def __init__(self, start: _Optional[_Union[GenerateStart, _Mapping]] = ..., embedding: _Optional[_Union[EmbeddingChunk, _Mapping]] = ...) -> None: ...

class GenerateStart(_message.Message):
    __slots__ = ("system_message", "history", "user_parts", "sampling", "inline_embeddings", "request_id", "adapter", "cache_salt", "priority")
    SYSTEM_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    USER_PARTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    INLINE_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    system_message: str
    history: _containers.RepeatedCompositeFieldContainer[Turn]
    user_parts: _containers.RepeatedCompositeFieldContainer[ContentPart]
    sampling: _common_pb2.SamplingParams
    inline_embeddings: bool
    request_id: str
    adapter: str
    cache_salt: str
    priority: _common_pb2.Priority
    def __init__(self, system_message: _Optional[str] = ..., history: _Optional[_Iterable[_Union[Turn, _Mapping]]] = ..., user_parts: _Optional[_Iterable[_Union[ContentPart, _Mapping]]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., inline_embeddings: _Optional[bool] = ..., request_id: _Optional[str] = ..., adapter: _Optional[str] = ..., cache_salt: _Optional[str] = ..., priority: _Optional[_Union[_common_pb2.Priority, str]] = ...) -> None: ...

class Turn(_message.Message):
    __slots__ = ("user_parts", "assistant_text")
    USER_PARTS_FIELD_NUMBER: _ClassVar[int]
    ASSISTANT_TEXT_FIELD_NUMBER: _ClassVar[int]
    user_parts: _containers.RepeatedCompositeFieldContainer[ContentPart]
    assistant_text: str
    def __init__(self, user_parts: _Optional[_Iterable[_Union[ContentPart, _Mapping]]] = ..., assistant_text: _Optional[str] = ...) -> None: ...

class ContentPart(_message.Message):
    __slots__ = ("text", "image", "video")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: ImageRef
    video: VideoRef
    def __init__(self, text: _Optional[str] = ..., image: _Optional[_Union[ImageRef, _Mapping]] = ..., video: _Optional[_Union[VideoRef, _Mapping]] = ...) -> None: ...

class ImageRef(_message.Message):
    __slots__ = ("key", "num_tiles")
    KEY_FIELD_NUMBER: _ClassVar[int]
    NUM_TILES_FIELD_NUMBER: _ClassVar[int]
    key: str
    num_tiles: int
    def __init__(self, key: _Optional[str] = ..., num_tiles: _Optional[int] = ...) -> None: ...

class VideoRef(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[ImageRef]
    def __init__(self, frames: _Optional[_Iterable[_Union[ImageRef, _Mapping]]] = ...) -> None: ...

class EmbeddingChunk(_message.Message):
    __slots__ = ("key", "chunk")
    KEY_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    key: str
    chunk: _common_pb2.TensorChunk
    def __init__(self, key: _Optional[str] = ..., chunk: _Optional[_Union[_common_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("delta", "finish")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    delta: TokenDelta
    finish: GenerateFinish
    def __init__(self, delta: _Optional[_Union[TokenDelta, _Mapping]] = ..., finish: _Optional[_Union[GenerateFinish, _Mapping]] = ...) -> None: ...

class TokenDelta(_message.Message):
    __slots__ = ("text", "token_ids", "top_logprobs", "index")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprobs]
    index: int
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[_Union[TopLogprobs, _Mapping]]] = ..., index: _Optional[int] = ...) -> None: ...

class TopLogprobs(_message.Message):
    __slots__ = ("logprob", "token_ids", "logprobs")
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    logprob: float
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, logprob: _Optional[float] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class GenerateFinish(_message.Message):
    __slots__ = ("reason", "usage", "index")
    REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    index: int
    def __init__(self, reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., index: _Optional[int] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model_info",)
    MODEL_INFO_FIELD_NUMBER: _ClassVar[int]
    model_info: _common_pb2.ModelInfo
    def __init__(self, model_info: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...
