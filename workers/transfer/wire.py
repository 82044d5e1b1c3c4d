"""TransferStateRequest messages on the wire, without copying payloads through protobuf.

A chunk message is an ordinary baton.decode.v1.TransferStateRequest (any protobuf library
reads it), but this module writes it by hand: the small ChunkHeader is serialized by
protobuf, the payload is appended as field 15 straight from the tensor's memory (one copy,
into the message bytes gRPC needs), and padding (field 14) places the payload at an aligned
offset so the receiver can view it in place. Reading walks the wire format and returns the
payload as a memoryview into the received message: no copy until the bytes land in the cache.

    TransferStateRequest { chunk (2): StateChunk { header (1), padding (14), data (15) } }
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from google.protobuf.message import DecodeError

from baton.proto.baton.decode.v1 import decode_pb2
from baton.proto.baton.transfer.v1 import transfer_pb2
from baton.workers.engine import StateKind
from baton.workers.transfer.base import (
    DTYPES,
    ChunkDescription,
    FailureReason,
    FirstToken,
    ReservationBinding,
    StateDescription,
    TransferError,
)

# Payload offset alignment within a message. Python bytes objects start their data 16-byte
# aligned on 64-bit CPython, so this makes the payload at least 16-byte aligned in memory.
ALIGNMENT = 64

_KIND_TO_PB = {
    StateKind.KV: transfer_pb2.STATE_KIND_KV,
    StateKind.CONV: transfer_pb2.STATE_KIND_CONV,
    StateKind.SSM: transfer_pb2.STATE_KIND_SSM,
    StateKind.MTP_KV: transfer_pb2.STATE_KIND_MTP_KV,
    StateKind.HIDDEN: transfer_pb2.STATE_KIND_HIDDEN,
}
_PB_TO_KIND = {v: k for k, v in _KIND_TO_PB.items()}
_DTYPE_TO_PB = {dtype: transfer_pb2.DType.Value(f"DTYPE_{name.upper()}")
                for dtype, name in DTYPES.items()}
_PB_TO_DTYPE = {v: k for k, v in _DTYPE_TO_PB.items()}

_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise TransferError(FailureReason.DATA_LOSS, "truncated or malformed varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview):
    """Yields (field number, wire type, value) of one message; LEN values as memoryviews."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _WIRE_VARINT:
            value, pos = _read_varint(buf, pos)
        elif wire == _WIRE_LEN:
            length, pos = _read_varint(buf, pos)
            if pos + length > len(buf):
                raise TransferError(FailureReason.DATA_LOSS, "field overruns the message")
            value, pos = buf[pos:pos + length], pos + length
        elif wire in (_WIRE_I64, _WIRE_I32):
            width = 8 if wire == _WIRE_I64 else 4
            value, pos = buf[pos:pos + width], pos + width
        else:
            raise TransferError(FailureReason.DATA_LOSS, f"unsupported wire type {wire}")
        yield number, wire, value


def _tag(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


_CHUNK_TAG = _tag(2, _WIRE_LEN)
_HEADER_TAG = _tag(1, _WIRE_LEN)
_PADDING_TAG = _tag(14, _WIRE_LEN)
_DATA_TAG = _tag(15, _WIRE_LEN)


def header_message(chunk: ChunkDescription) -> transfer_pb2.ChunkHeader:
    s = chunk.state
    return transfer_pb2.ChunkHeader(
        request_id=s.request_id, state_index=s.state_index, layer=s.layer,
        kind=_KIND_TO_PB[s.kind], token_start=s.token_start, token_end=s.token_end,
        shape=list(s.shape), dtype=_DTYPE_TO_PB[s.dtype], state_nbytes=s.nbytes,
        offset=chunk.offset, xxh3_64=chunk.checksum)


def encode_chunk(chunk: ChunkDescription, data: memoryview) -> bytes:
    """One TransferStateRequest{chunk} with data copied once, at an ALIGNMENT offset."""
    header = header_message(chunk).SerializeToString()
    head = _HEADER_TAG + _varint(len(header)) + header
    tail = _DATA_TAG + _varint(len(data))
    # The inner length's varint width depends on the padding, which depends on that width;
    # varints grow by one byte per 7 bits, so two passes settle it.
    padding = 0
    for _ in range(3):
        pad_field = _PADDING_TAG + _varint(padding) + bytes(padding)
        inner_len = len(head) + len(pad_field) + len(tail) + len(data)
        prefix_len = len(_CHUNK_TAG) + len(_varint(inner_len))
        offset = prefix_len + len(head) + len(pad_field) + len(tail)
        if offset % ALIGNMENT == 0:
            break
        padding += (-offset) % ALIGNMENT
    return b"".join((_CHUNK_TAG, _varint(inner_len), head, pad_field, tail, data))


def encode_handshake(protocol_version: int, fingerprint: str, reservation_id: str,
                     request_id: str, num_prompt_tokens: int, token_start: int,
                     binding: ReservationBinding) -> bytes:
    return decode_pb2.TransferStateRequest(handshake=transfer_pb2.Handshake(
        protocol_version=protocol_version, fingerprint=fingerprint, request_id=request_id,
        num_prompt_tokens=num_prompt_tokens, reservation_id=reservation_id,
        token_start=token_start, reservation_token=binding.token,
        prompt_chain_hash=binding.chain_hash)).SerializeToString()


def encode_complete(first_token: FirstToken, num_states: int, total_bytes: int,
                    cached_tokens: int = 0) -> bytes:
    from baton.proto.baton.worker.v1 import worker_pb2

    token = worker_pb2.GeneratedToken(
        token_id=first_token.token_id, logprob=first_token.logprob,
        top_logprobs=[worker_pb2.TokenLogprob(token_id=t, logprob=lp)
                      for t, lp in first_token.top_logprobs])
    return decode_pb2.TransferStateRequest(complete=transfer_pb2.TransferComplete(
        first_token=token, num_states=num_states, total_bytes=total_bytes,
        cached_tokens=cached_tokens)).SerializeToString()


@dataclass(frozen=True)
class Handshake:
    protocol_version: int
    fingerprint: str
    request_id: str
    num_prompt_tokens: int
    reservation_id: str = ""
    token_start: int = 0
    binding: ReservationBinding = ReservationBinding("", b"")


@dataclass(frozen=True)
class Chunk:
    description: ChunkDescription
    data: memoryview


@dataclass(frozen=True)
class Complete:
    first_token: FirstToken
    num_states: int
    total_bytes: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class Malformed:
    """A message that could not be read; the handler fails the transfer with its error."""

    error: TransferError


def read_message(message: bytes) -> Handshake | Chunk | Complete | Malformed:
    """decode_message for gRPC's deserializer hook, which must not raise: an exception there
    would end the call as INTERNAL instead of the DATA_LOSS the sender must see."""
    try:
        return decode_message(message)
    except TransferError as e:
        return Malformed(e)


def chunk_description(header: transfer_pb2.ChunkHeader, length: int) -> ChunkDescription:
    if header.kind not in _PB_TO_KIND:
        raise TransferError(FailureReason.INVALID, f"chunk kind {header.kind} is not a "
                            "known StateKind")
    if header.dtype not in _PB_TO_DTYPE:
        raise TransferError(FailureReason.INVALID, f"chunk dtype {header.dtype} is not a "
                            "known DType")
    state = StateDescription(
        request_id=header.request_id, state_index=header.state_index, layer=header.layer,
        kind=_PB_TO_KIND[header.kind], token_start=header.token_start,
        token_end=header.token_end, shape=tuple(header.shape), dtype=_PB_TO_DTYPE[header.dtype],
        nbytes=header.state_nbytes)
    return ChunkDescription(state=state, offset=header.offset, length=length,
                            checksum=header.xxh3_64)


def decode_message(message: bytes) -> Handshake | Chunk | Complete:
    """Reads one TransferStateRequest; a chunk's data is a view into message."""
    buf = memoryview(message)
    fields = list(_fields(buf))
    if len(fields) == 1 and fields[0][:2] == (2, _WIRE_LEN):
        header = None
        data = memoryview(b"")
        for number, wire, value in _fields(fields[0][2]):
            if number == 1 and wire == _WIRE_LEN:
                try:
                    header = transfer_pb2.ChunkHeader.FromString(bytes(value))
                except DecodeError as e:
                    raise TransferError(FailureReason.DATA_LOSS,
                                        f"malformed chunk header: {e}") from None
            elif number == 15 and wire == _WIRE_LEN:
                data = value
        if header is None:
            raise TransferError(FailureReason.INVALID, "state chunk without a header")
        return Chunk(chunk_description(header, len(data)), data)
    # Handshakes and completions are small; anything else protobuf parses in full.
    try:
        request = decode_pb2.TransferStateRequest.FromString(message)
    except DecodeError as e:
        raise TransferError(FailureReason.DATA_LOSS, f"malformed message: {e}") from None
    which = request.WhichOneof("message")
    if which == "handshake":
        h = request.handshake
        return Handshake(h.protocol_version, h.fingerprint, h.request_id, h.num_prompt_tokens,
                         h.reservation_id, h.token_start,
                         ReservationBinding(h.reservation_token, h.prompt_chain_hash))
    if which == "complete":
        c = request.complete
        first = FirstToken(c.first_token.token_id, c.first_token.logprob,
                           tuple((t.token_id, t.logprob) for t in c.first_token.top_logprobs))
        return Complete(first, c.num_states, c.total_bytes, c.cached_tokens)
    if which == "chunk":
        return Chunk(chunk_description(request.chunk.header, len(request.chunk.data)),
                     memoryview(request.chunk.data))
    raise TransferError(FailureReason.INVALID, "empty TransferStateRequest")


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU, C-contiguous tensor as a flat memoryview (no copy)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError(f"tensor must be CPU and contiguous, got {tensor.device} "
                         f"contiguous={tensor.is_contiguous()}")
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")
