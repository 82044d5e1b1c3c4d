# ruff: noqa
from baton.proto.baton.worker.v1 import worker_pb2 as _worker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StateKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATE_KIND_UNSPECIFIED: _ClassVar[StateKind]
    STATE_KIND_KV: _ClassVar[StateKind]
    STATE_KIND_CONV: _ClassVar[StateKind]
    STATE_KIND_SSM: _ClassVar[StateKind]
    STATE_KIND_MTP_KV: _ClassVar[StateKind]
    STATE_KIND_HIDDEN: _ClassVar[StateKind]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_FLOAT8_E4M3FN: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
STATE_KIND_UNSPECIFIED: StateKind
STATE_KIND_KV: StateKind
STATE_KIND_CONV: StateKind
STATE_KIND_SSM: StateKind
STATE_KIND_MTP_KV: StateKind
STATE_KIND_HIDDEN: StateKind
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT16: DType
DTYPE_FLOAT8_E4M3FN: DType
DTYPE_UINT8: DType
DTYPE_INT8: DType
DTYPE_INT32: DType
DTYPE_INT64: DType

class Handshake(_message.Message):
    __slots__ = ("protocol_version", "fingerprint", "request_id", "num_prompt_tokens", "reservation_id", "token_start", "reservation_token", "prompt_chain_hash")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CHAIN_HASH_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    fingerprint: str
    request_id: str
    num_prompt_tokens: int
    reservation_id: str
    token_start: int
    reservation_token: str
    prompt_chain_hash: bytes
    def __init__(self, protocol_version: _Optional[int] = ..., fingerprint: _Optional[str] = ..., request_id: _Optional[str] = ..., num_prompt_tokens: _Optional[int] = ..., reservation_id: _Optional[str] = ..., token_start: _Optional[int] = ..., reservation_token: _Optional[str] = ..., prompt_chain_hash: _Optional[bytes] = ...) -> None: ...

class ChunkHeader(_message.Message):
    __slots__ = ("request_id", "state_index", "layer", "kind", "token_start", "token_end", "shape", "dtype", "state_nbytes", "offset", "xxh3_64")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    STATE_NBYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    XXH3_64_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    state_index: int
    layer: int
    kind: StateKind
    token_start: int
    token_end: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    state_nbytes: int
    offset: int
    xxh3_64: int
    def __init__(self, request_id: _Optional[str] = ..., state_index: _Optional[int] = ..., layer: _Optional[int] = ..., kind: _Optional[_Union[StateKind, str]] = ..., token_start: _Optional[int] = ..., token_end: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., state_nbytes: _Optional[int] = ..., offset: _Optional[int] = ..., xxh3_64: _Optional[int] = ...) -> None: ...

class StateChunk(_message.Message):
    __slots__ = ("header", "padding", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ChunkHeader
    padding: bytes
    data: bytes
    def __init__(self, header: _Optional[_Union[ChunkHeader, _Mapping]] = ..., padding: _Optional[bytes] = ..., data: _Optional[bytes] = ...) -> None: ...

class TransferComplete(_message.Message):
    __slots__ = ("first_token", "num_states", "total_bytes", "cached_tokens")
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NUM_STATES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    first_token: _worker_pb2.GeneratedToken
    num_states: int
    total_bytes: int
    cached_tokens: int
    def __init__(self, first_token: _Optional[_Union[_worker_pb2.GeneratedToken, _Mapping]] = ..., num_states: _Optional[int] = ..., total_bytes: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...
