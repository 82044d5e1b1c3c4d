"""wire: hand-encoded chunk messages against protobuf, and malformed input."""

from __future__ import annotations

import pytest
import torch

from baton.proto.baton.decode.v1 import decode_pb2
from baton.proto.baton.transfer.v1 import transfer_pb2
from baton.workers.engine import StateKind
from baton.workers.transfer import (
    FailureReason,
    FirstToken,
    ReservationBinding,
    TransferError,
    wire,
)
from baton.workers.transfer.base import ChunkDescription, StateDescription


def _chunk(request_id: str = "r", nbytes: int = 4000) -> ChunkDescription:
    desc = StateDescription(request_id, 3, 5, StateKind.SSM, 0, 9, (nbytes // 4,),
                            torch.float32, nbytes)
    return ChunkDescription(desc, 0, nbytes, 1234)


@pytest.mark.parametrize("nbytes", [4, 4000, 1 << 20])
@pytest.mark.parametrize("request_id", ["r", "r" * 150])
def test_chunk_is_plain_protobuf_and_aligned(nbytes, request_id):
    data = torch.arange(nbytes // 4, dtype=torch.float32)
    chunk = _chunk(request_id, nbytes)
    message = wire.encode_chunk(chunk, wire.tensor_bytes(data))
    parsed = decode_pb2.TransferStateRequest.FromString(message)
    assert parsed.chunk.header == wire.header_message(chunk)
    assert parsed.chunk.data == data.numpy().tobytes()
    # The payload is the message's tail, at an aligned offset.
    assert message[len(message) - nbytes:] == parsed.chunk.data
    assert (len(message) - nbytes) % wire.ALIGNMENT == 0
    decoded = wire.decode_message(message)
    assert decoded.description == chunk
    assert bytes(decoded.data) == parsed.chunk.data


def test_messages_written_by_protobuf_decode_too():
    header = wire.header_message(_chunk())
    # Fields in another order than ours (data before header), as another client might write.
    message = (decode_pb2.TransferStateRequest(chunk=transfer_pb2.StateChunk(
        data=b"\x01" * 4000)).SerializeToString())
    message += decode_pb2.TransferStateRequest(chunk=transfer_pb2.StateChunk(
        header=header)).SerializeToString()
    decoded = wire.decode_message(message)
    assert decoded.description.state.layer == 5 and bytes(decoded.data) == b"\x01" * 4000
    first = FirstToken(7, -0.5, ((7, -0.5),))
    complete = wire.decode_message(wire.encode_complete(first, 3, 99, cached_tokens=40))
    assert complete == wire.Complete(first, 3, 99, 40)
    handshake = wire.decode_message(wire.encode_handshake(1, "ab", "res", "r", 12, 8,
                                                          ReservationBinding("t", b"h")))
    assert handshake == wire.Handshake(1, "ab", "r", 12, "res", 8, ReservationBinding("t", b"h"))


@pytest.mark.parametrize("bad", [
    b"\x12",                      # chunk field with its length missing
    b"\x12\x80",                  # truncated varint
    b"\x12\x05\x0a\x10abc",       # header overruns the chunk
    b"\x12\x02\x7a\x00",          # a chunk with data but no header
    b"\x12\x03\x0a\x01\xff",      # a header protobuf cannot parse
    b"\x0a\x03\x08\xff\xff",      # a handshake protobuf cannot parse
    b"",                          # no message at all
])
def test_malformed_messages_are_errors(bad):
    with pytest.raises(TransferError) as err:
        wire.decode_message(bad)
    assert err.value.reason in (FailureReason.DATA_LOSS, FailureReason.INVALID)


def test_unknown_kind_or_dtype_is_invalid():
    header = wire.header_message(_chunk())
    header.kind = 99
    message = decode_pb2.TransferStateRequest(chunk=transfer_pb2.StateChunk(
        header=header, data=b"\x00" * 4)).SerializeToString()
    with pytest.raises(TransferError) as err:
        wire.decode_message(message)
    assert err.value.reason is FailureReason.INVALID and "kind" in err.value.message
