from internvl.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union
from internvl.common.v1.common_pb2 import Tensor as Tensor
from internvl.common.v1.common_pb2 import TensorHeader as TensorHeader
from internvl.common.v1.common_pb2 import TensorChunk as TensorChunk
from internvl.common.v1.common_pb2 import ModelInfo as ModelInfo
from internvl.common.v1.common_pb2 import AdapterInfo as AdapterInfo
from internvl.common.v1.common_pb2 import PreprocessOptions as PreprocessOptions
from internvl.common.v1.common_pb2 import ErrorDetail as ErrorDetail
from internvl.common.v1.common_pb2 import Constraint as Constraint
from internvl.common.v1.common_pb2 import JsonObject as JsonObject
from internvl.common.v1.common_pb2 import JsonSchema as JsonSchema
from internvl.common.v1.common_pb2 import ChoiceList as ChoiceList
from internvl.common.v1.common_pb2 import SamplingParams as SamplingParams
from internvl.common.v1.common_pb2 import Usage as Usage
from internvl.common.v1.common_pb2 import DType as DType
from internvl.common.v1.common_pb2 import ErrorCode as ErrorCode
from internvl.common.v1.common_pb2 import Priority as Priority
from internvl.common.v1.common_pb2 import FinishReason as FinishReason

DESCRIPTOR: _descriptor.FileDescriptor
DTYPE_UNSPECIFIED: _common_pb2.DType
DTYPE_BFLOAT16: _common_pb2.DType
DTYPE_FLOAT16: _common_pb2.DType
DTYPE_FLOAT32: _common_pb2.DType
ERROR_CODE_UNSPECIFIED: _common_pb2.ErrorCode
ERROR_CODE_INVALID_ARGUMENT: _common_pb2.ErrorCode
ERROR_CODE_INVALID_MEDIA: _common_pb2.ErrorCode
ERROR_CODE_MEDIA_TOO_LARGE: _common_pb2.ErrorCode
ERROR_CODE_EMBEDDINGS_MISSING: _common_pb2.ErrorCode
ERROR_CODE_MODEL_MISMATCH: _common_pb2.ErrorCode
ERROR_CODE_CONTEXT_TOO_LONG: _common_pb2.ErrorCode
ERROR_CODE_OVERLOADED: _common_pb2.ErrorCode
ERROR_CODE_NOT_READY: _common_pb2.ErrorCode
ERROR_CODE_INTERNAL: _common_pb2.ErrorCode
ERROR_CODE_NOT_FOUND: _common_pb2.ErrorCode
ERROR_CODE_SESSION_NOT_FOUND: _common_pb2.ErrorCode
ERROR_CODE_SESSION_BUSY: _common_pb2.ErrorCode
ERROR_CODE_MEDIA_ACCESS_DENIED: _common_pb2.ErrorCode
ERROR_CODE_REQUEST_TOO_LARGE: _common_pb2.ErrorCode
ERROR_CODE_DEADLINE_EXCEEDED: _common_pb2.ErrorCode
PRIORITY_UNSPECIFIED: _common_pb2.Priority
PRIORITY_CRITICAL: _common_pb2.Priority
PRIORITY_STANDARD: _common_pb2.Priority
PRIORITY_SHEDDABLE: _common_pb2.Priority
FINISH_REASON_UNSPECIFIED: _common_pb2.FinishReason
FINISH_REASON_STOP: _common_pb2.FinishReason
FINISH_REASON_LENGTH: _common_pb2.FinishReason
FINISH_REASON_CANCELLED: _common_pb2.FinishReason

class ImageDetail(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_DETAIL_UNSPECIFIED: _ClassVar[ImageDetail]
    IMAGE_DETAIL_AUTO: _ClassVar[ImageDetail]
    IMAGE_DETAIL_LOW: _ClassVar[ImageDetail]
    IMAGE_DETAIL_HIGH: _ClassVar[ImageDetail]

class MultiImageMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MULTI_IMAGE_MODE_UNSPECIFIED: _ClassVar[MultiImageMode]
    MULTI_IMAGE_MODE_SEPARATE: _ClassVar[MultiImageMode]
    MULTI_IMAGE_MODE_COMBINED: _ClassVar[MultiImageMode]
IMAGE_DETAIL_UNSPECIFIED: ImageDetail
IMAGE_DETAIL_AUTO: ImageDetail
IMAGE_DETAIL_LOW: ImageDetail
IMAGE_DETAIL_HIGH: ImageDetail
MULTI_IMAGE_MODE_UNSPECIFIED: MultiImageMode
MULTI_IMAGE_MODE_SEPARATE: MultiImageMode
MULTI_IMAGE_MODE_COMBINED: MultiImageMode

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ServedModel]
    def __init__(self, models: _Optional[_Iterable[_Union[ServedModel, _Mapping]]] = ...) -> None: ...

class ServedModel(_message.Message):
    __slots__ = ("id", "parent", "adapter")
    ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    id: str
    parent: str
    adapter: _common_pb2.AdapterInfo
    def __init__(self, id: _Optional[str] = ..., parent: _Optional[str] = ..., adapter: _Optional[_Union[_common_pb2.AdapterInfo, _Mapping]] = ...) -> None: ...

class ImageInput(_message.Message):
    __slots__ = ("data", "path", "url", "detail")
    DATA_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    path: str
    url: str
    detail: ImageDetail
    def __init__(self, data: _Optional[bytes] = ..., path: _Optional[str] = ..., url: _Optional[str] = ..., detail: _Optional[_Union[ImageDetail, str]] = ...) -> None: ...

class TimeBound(_message.Message):
    __slots__ = ("start_s", "end_s")
    START_S_FIELD_NUMBER: _ClassVar[int]
    END_S_FIELD_NUMBER: _ClassVar[int]
    start_s: float
    end_s: float
    def __init__(self, start_s: _Optional[float] = ..., end_s: _Optional[float] = ...) -> None: ...

class VideoInput(_message.Message):
    __slots__ = ("data", "path", "url", "num_segments", "bound", "max_num")
    DATA_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    NUM_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    BOUND_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    path: str
    url: str
    num_segments: int
    bound: TimeBound
    max_num: int
    def __init__(self, data: _Optional[bytes] = ..., path: _Optional[str] = ..., url: _Optional[str] = ..., num_segments: _Optional[int] = ..., bound: _Optional[_Union[TimeBound, _Mapping]] = ..., max_num: _Optional[int] = ...) -> None: ...

class ContentPart(_message.Message):
    __slots__ = ("text", "image", "video")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: ImageInput
    video: VideoInput
    def __init__(self, text: _Optional[str] = ..., image: _Optional[_Union[ImageInput, _Mapping]] = ..., video: _Optional[_Union[VideoInput, _Mapping]] = ...) -> None: ...

class Turn(_message.Message):
    __slots__ = ("user_content", "assistant_text")
    USER_CONTENT_FIELD_NUMBER: _ClassVar[int]
    ASSISTANT_TEXT_FIELD_NUMBER: _ClassVar[int]
    user_content: _containers.RepeatedCompositeFieldContainer[ContentPart]
    assistant_text: str
    def __init__(self, user_content: _Optional[_Iterable[_Union[ContentPart, _Mapping]]] = ..., assistant_text: _Optional[str] = ...) -> None: ...

class ChatRequest(_message.Message):
    __slots__ = ("content", "history", "session_id", "max_num", "multi_image_mode", "sampling", "system_message", "request_id", "model", "priority")
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_FIELD_NUMBER: _ClassVar[int]
    MULTI_IMAGE_MODE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    content: _containers.RepeatedCompositeFieldContainer[ContentPart]
    history: _containers.RepeatedCompositeFieldContainer[Turn]
    session_id: str
    max_num: int
    multi_image_mode: MultiImageMode
    sampling: _common_pb2.SamplingParams
    system_message: str
    request_id: str
    model: str
    priority: _common_pb2.Priority
    def __init__(self, content: _Optional[_Iterable[_Union[ContentPart, _Mapping]]] = ..., history: _Optional[_Iterable[_Union[Turn, _Mapping]]] = ..., session_id: _Optional[str] = ..., max_num: _Optional[int] = ..., multi_image_mode: _Optional[_Union[MultiImageMode, str]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., system_message: _Optional[str] = ..., request_id: _Optional[str] = ..., model: _Optional[str] = ..., priority: _Optional[_Union[_common_pb2.Priority, str]] = ...) -> None: ...

class TokenLogprobs(_message.Message):
    __slots__ = ("token_id", "logprob", "top")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    top: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class ChatDelta(_message.Message):
    __slots__ = ("text", "token_ids", "logprobs", "index")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprobs]
    index: int
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprobs, _Mapping]]] = ..., index: _Optional[int] = ...) -> None: ...

class ChatFinish(_message.Message):
    __slots__ = ("reason", "usage", "session_id", "index", "request_id")
    REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    session_id: str
    index: int
    request_id: str
    def __init__(self, reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., session_id: _Optional[str] = ..., index: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class ChatResponse(_message.Message):
    __slots__ = ("delta", "finish")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    delta: ChatDelta
    finish: ChatFinish
    def __init__(self, delta: _Optional[_Union[ChatDelta, _Mapping]] = ..., finish: _Optional[_Union[ChatFinish, _Mapping]] = ...) -> None: ...

class BatchChatRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[ChatRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[ChatRequest, _Mapping]]] = ...) -> None: ...

class ChatResult(_message.Message):
    __slots__ = ("text", "token_ids", "logprobs", "finish_reason", "usage", "session_id", "request_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprobs]
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    session_id: str
    request_id: str
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprobs, _Mapping]]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., session_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class BatchChatResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ChatResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ChatResult, _Mapping]]] = ...) -> None: ...
