from internvl.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RawFrame(_message.Message):
    __slots__ = ("rgb", "height", "width")
    RGB_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    rgb: bytes
    height: int
    width: int
    def __init__(self, rgb: _Optional[bytes] = ..., height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class EncodeItem(_message.Message):
    __slots__ = ("image_bytes", "frame")
    IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    image_bytes: bytes
    frame: RawFrame
    def __init__(self, image_bytes: _Optional[bytes] = ..., frame: _Optional[_Union[RawFrame, _Mapping]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("items", "options", "adapter", "key_salt")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    KEY_SALT_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[EncodeItem]
    options: _common_pb2.PreprocessOptions
    adapter: str
    key_salt: str
    def __init__(self, items: _Optional[_Iterable[_Union[EncodeItem, _Mapping]]] = ..., options: _Optional[_Union[_common_pb2.PreprocessOptions, _Mapping]] = ..., adapter: _Optional[str] = ..., key_salt: _Optional[str] = ...) -> None: ...

class EncodedItem(_message.Message):
    __slots__ = ("key", "num_tiles", "num_tokens", "cache_hit")
    KEY_FIELD_NUMBER: _ClassVar[int]
    NUM_TILES_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    key: str
    num_tiles: int
    num_tokens: int
    cache_hit: bool
    def __init__(self, key: _Optional[str] = ..., num_tiles: _Optional[int] = ..., num_tokens: _Optional[int] = ..., cache_hit: _Optional[bool] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[EncodedItem]
    def __init__(self, items: _Optional[_Iterable[_Union[EncodedItem, _Mapping]]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys: _Optional[_Iterable[str]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("exists",)
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    exists: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, exists: _Optional[_Iterable[bool]] = ...) -> None: ...

class FetchEmbeddingsRequest(_message.Message):
    __slots__ = ("key", "max_chunk_bytes", "item", "options", "adapter", "key_salt")
    KEY_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    KEY_SALT_FIELD_NUMBER: _ClassVar[int]
    key: str
    max_chunk_bytes: int
    item: EncodeItem
    options: _common_pb2.PreprocessOptions
    adapter: str
    key_salt: str
    def __init__(self, key: _Optional[str] = ..., max_chunk_bytes: _Optional[int] = ..., item: _Optional[_Union[EncodeItem, _Mapping]] = ..., options: _Optional[_Union[_common_pb2.PreprocessOptions, _Mapping]] = ..., adapter: _Optional[str] = ..., key_salt: _Optional[str] = ...) -> None: ...

class FetchEmbeddingsResponse(_message.Message):
    __slots__ = ("chunk",)
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    chunk: _common_pb2.TensorChunk
    def __init__(self, chunk: _Optional[_Union[_common_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model_info",)
    MODEL_INFO_FIELD_NUMBER: _ClassVar[int]
    model_info: _common_pb2.ModelInfo
    def __init__(self, model_info: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...
