# ruff: noqa
import datetime

from baton.proto.baton.transfer.v1 import transfer_pb2 as _transfer_pb2
from baton.proto.baton.worker.v1 import worker_pb2 as _worker_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_ABORT: _ClassVar[FinishReason]
    FINISH_REASON_GRAMMAR_ERROR: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_ABORT: FinishReason
FINISH_REASON_GRAMMAR_ERROR: FinishReason

class ReserveRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "deadline", "num_output_tokens", "local_prefill_max_tokens", "cache_salt", "snapshot_points")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PREFILL_MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_POINTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _worker_pb2.SamplingParams
    deadline: _timestamp_pb2.Timestamp
    num_output_tokens: int
    local_prefill_max_tokens: int
    cache_salt: bytes
    snapshot_points: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_worker_pb2.SamplingParams, _Mapping]] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., num_output_tokens: _Optional[int] = ..., local_prefill_max_tokens: _Optional[int] = ..., cache_salt: _Optional[bytes] = ..., snapshot_points: _Optional[_Iterable[int]] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("reservation_id", "cached_tokens", "local_prefill", "reservation_token", "prompt_chain_hash")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PREFILL_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CHAIN_HASH_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    cached_tokens: int
    local_prefill: bool
    reservation_token: str
    prompt_chain_hash: bytes
    def __init__(self, reservation_id: _Optional[str] = ..., cached_tokens: _Optional[int] = ..., local_prefill: _Optional[bool] = ..., reservation_token: _Optional[str] = ..., prompt_chain_hash: _Optional[bytes] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("reservation_id",)
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    def __init__(self, reservation_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "reservation_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reservation_id: str
    def __init__(self, request_id: _Optional[str] = ..., reservation_id: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("tokens", "finish_reason", "num_prompt_tokens", "num_generated_tokens", "num_cached_tokens")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[_worker_pb2.GeneratedToken]
    finish_reason: FinishReason
    num_prompt_tokens: int
    num_generated_tokens: int
    num_cached_tokens: int
    def __init__(self, tokens: _Optional[_Iterable[_Union[_worker_pb2.GeneratedToken, _Mapping]]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., num_prompt_tokens: _Optional[int] = ..., num_generated_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ...) -> None: ...

class TransferStateRequest(_message.Message):
    __slots__ = ("handshake", "chunk", "complete")
    HANDSHAKE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    handshake: _transfer_pb2.Handshake
    chunk: _transfer_pb2.StateChunk
    complete: _transfer_pb2.TransferComplete
    def __init__(self, handshake: _Optional[_Union[_transfer_pb2.Handshake, _Mapping]] = ..., chunk: _Optional[_Union[_transfer_pb2.StateChunk, _Mapping]] = ..., complete: _Optional[_Union[_transfer_pb2.TransferComplete, _Mapping]] = ...) -> None: ...

class TransferStateResponse(_message.Message):
    __slots__ = ("received_bytes", "received_states")
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_STATES_FIELD_NUMBER: _ClassVar[int]
    received_bytes: int
    received_states: int
    def __init__(self, received_bytes: _Optional[int] = ..., received_states: _Optional[int] = ...) -> None: ...
