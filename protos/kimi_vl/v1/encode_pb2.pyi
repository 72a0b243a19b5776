from protos.kimi_vl.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeRequest(_message.Message):
    __slots__ = ("pixel_values", "grid_hws", "content_hashes", "keys_only")
    PIXEL_VALUES_FIELD_NUMBER: _ClassVar[int]
    GRID_HWS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASHES_FIELD_NUMBER: _ClassVar[int]
    KEYS_ONLY_FIELD_NUMBER: _ClassVar[int]
    pixel_values: _tensor_pb2.Tensor
    grid_hws: _tensor_pb2.Tensor
    content_hashes: _containers.RepeatedScalarFieldContainer[str]
    keys_only: bool
    def __init__(self, pixel_values: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., grid_hws: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., content_hashes: _Optional[_Iterable[str]] = ..., keys_only: _Optional[bool] = ...) -> None: ...

class EncodedImageInfo(_message.Message):
    __slots__ = ("dtype", "shape", "cache_hit", "cache_key")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    CACHE_KEY_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    cache_hit: bool
    cache_key: str
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., cache_hit: _Optional[bool] = ..., cache_key: _Optional[str] = ...) -> None: ...

class EncodedImage(_message.Message):
    __slots__ = ("info", "embeddings")
    INFO_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    info: EncodedImageInfo
    embeddings: _tensor_pb2.Tensor
    def __init__(self, info: _Optional[_Union[EncodedImageInfo, _Mapping]] = ..., embeddings: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("images", "model_fingerprint")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[EncodedImage]
    model_fingerprint: str
    def __init__(self, images: _Optional[_Iterable[_Union[EncodedImage, _Mapping]]] = ..., model_fingerprint: _Optional[str] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("cache_keys",)
    CACHE_KEYS_FIELD_NUMBER: _ClassVar[int]
    cache_keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, cache_keys: _Optional[_Iterable[str]] = ...) -> None: ...

class EmbeddingChunk(_message.Message):
    __slots__ = ("data", "item", "offset", "info", "model_fingerprint")
    DATA_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    item: int
    offset: int
    info: EncodedImageInfo
    model_fingerprint: str
    def __init__(self, data: _Optional[bytes] = ..., item: _Optional[int] = ..., offset: _Optional[int] = ..., info: _Optional[_Union[EncodedImageInfo, _Mapping]] = ..., model_fingerprint: _Optional[str] = ...) -> None: ...
