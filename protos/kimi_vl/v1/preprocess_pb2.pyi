from protos.kimi_vl.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MediaKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEDIA_KIND_AUTO: _ClassVar[MediaKind]
    MEDIA_KIND_IMAGE: _ClassVar[MediaKind]
    MEDIA_KIND_VIDEO: _ClassVar[MediaKind]
MEDIA_KIND_AUTO: MediaKind
MEDIA_KIND_IMAGE: MediaKind
MEDIA_KIND_VIDEO: MediaKind

class MediaItem(_message.Message):
    __slots__ = ("data", "base64", "url", "kind")
    DATA_FIELD_NUMBER: _ClassVar[int]
    BASE64_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    base64: str
    url: str
    kind: MediaKind
    def __init__(self, data: _Optional[bytes] = ..., base64: _Optional[str] = ..., url: _Optional[str] = ..., kind: _Optional[_Union[MediaKind, str]] = ...) -> None: ...

class VideoOptions(_message.Message):
    __slots__ = ("fps", "max_frames", "frame_token_limit")
    FPS_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FRAME_TOKEN_LIMIT_FIELD_NUMBER: _ClassVar[int]
    fps: float
    max_frames: int
    frame_token_limit: int
    def __init__(self, fps: _Optional[float] = ..., max_frames: _Optional[int] = ..., frame_token_limit: _Optional[int] = ...) -> None: ...

class PreprocessRequest(_message.Message):
    __slots__ = ("items", "video")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[MediaItem]
    video: VideoOptions
    def __init__(self, items: _Optional[_Iterable[_Union[MediaItem, _Mapping]]] = ..., video: _Optional[_Union[VideoOptions, _Mapping]] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("index", "timestamp_s", "timestamp", "content_hash", "num_tokens")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_S_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    index: int
    timestamp_s: float
    timestamp: str
    content_hash: str
    num_tokens: int
    def __init__(self, index: _Optional[int] = ..., timestamp_s: _Optional[float] = ..., timestamp: _Optional[str] = ..., content_hash: _Optional[str] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class ProcessedItem(_message.Message):
    __slots__ = ("kind", "pixel_values", "grid_hws", "num_tokens", "content_hash", "frames")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PIXEL_VALUES_FIELD_NUMBER: _ClassVar[int]
    GRID_HWS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    kind: MediaKind
    pixel_values: _tensor_pb2.Tensor
    grid_hws: _tensor_pb2.Tensor
    num_tokens: int
    content_hash: str
    frames: _containers.RepeatedCompositeFieldContainer[Frame]
    def __init__(self, kind: _Optional[_Union[MediaKind, str]] = ..., pixel_values: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., grid_hws: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., num_tokens: _Optional[int] = ..., content_hash: _Optional[str] = ..., frames: _Optional[_Iterable[_Union[Frame, _Mapping]]] = ...) -> None: ...

class PreprocessResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ProcessedItem]
    def __init__(self, items: _Optional[_Iterable[_Union[ProcessedItem, _Mapping]]] = ...) -> None: ...
