from protos.kimi_vl.v1 import chat_pb2 as _chat_pb2
from protos.kimi_vl.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EmbeddingSegment(_message.Message):
    __slots__ = ("num_tokens", "embeddings", "cache_key", "timestamp", "encoder_endpoint")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    CACHE_KEY_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    ENCODER_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    embeddings: _tensor_pb2.Tensor
    cache_key: str
    timestamp: str
    encoder_endpoint: str
    def __init__(self, num_tokens: _Optional[int] = ..., embeddings: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., cache_key: _Optional[str] = ..., timestamp: _Optional[str] = ..., encoder_endpoint: _Optional[str] = ...) -> None: ...

class MediaEmbeddings(_message.Message):
    __slots__ = ("segments",)
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    segments: _containers.RepeatedCompositeFieldContainer[EmbeddingSegment]
    def __init__(self, segments: _Optional[_Iterable[_Union[EmbeddingSegment, _Mapping]]] = ...) -> None: ...

class PromptTokens(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "tokens", "media", "sampling")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tokens: PromptTokens
    media: _containers.RepeatedCompositeFieldContainer[MediaEmbeddings]
    sampling: _chat_pb2.SamplingParams
    def __init__(self, request_id: _Optional[str] = ..., tokens: _Optional[_Union[PromptTokens, _Mapping]] = ..., media: _Optional[_Iterable[_Union[MediaEmbeddings, _Mapping]]] = ..., sampling: _Optional[_Union[_chat_pb2.SamplingParams, _Mapping]] = ...) -> None: ...
