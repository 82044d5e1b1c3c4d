"""IncomingTransfer's checks, driven directly (no transport): every bad message fails the
transfer with the right reason and releases the reservation exactly once."""

from __future__ import annotations

import time

import pytest
import torch

from baton.workers.engine import StateKind
from baton.workers.transfer import (
    PROTOCOL_VERSION,
    ChunkDescription,
    FailureReason,
    FirstToken,
    ReservationBinding,
    StateDescription,
    StateReceiver,
    TransferError,
    TransferState,
    checksum,
    wire,
)

FP = "a" * 64
BINDING = ReservationBinding("t" * 32, b"h" * 32)


class Target:
    def __init__(self):
        self.written, self.completed, self.failures = [], [], []
        self.bound = None

    def bind(self, token, chain_hash):
        if token != BINDING.token:
            raise ValueError("another reservation's token")
        self.bound = (token, chain_hash)

    def write(self, state):
        if state.layer == 99:
            raise ValueError("layer 99 is not in this model")
        self.written.append(state)

    def complete(self, first_token, cached_tokens=0):
        self.completed.append(first_token)

    def fail(self, error):
        self.failures.append(error)


def _open(n: int = 4):
    target = Target()
    incoming = StateReceiver(FP).expect("r", "r", n, 0, target, time.time() + 30)
    incoming.accept_handshake(PROTOCOL_VERSION, FP, "r", n, 0, BINDING)
    return incoming, target


def _chunks(tensor: torch.Tensor, index: int = 0, layer: int = 0, chunk: int = 64,
            request_id: str = "r"):
    data = wire.tensor_bytes(tensor.contiguous())
    desc = StateDescription(request_id, index, layer, StateKind.SSM, 0, 4, tuple(tensor.shape),
                            tensor.dtype, len(data))
    for offset in range(0, len(data), chunk):
        piece = data[offset:offset + chunk]
        yield ChunkDescription(desc, offset, len(piece), checksum(piece)), piece


def _fails(incoming, target, reason: FailureReason, call) -> TransferError:
    with pytest.raises(TransferError) as err:
        call()
    assert err.value.reason is reason
    assert incoming.state is TransferState.FAILED
    assert len(target.failures) == 1 and target.failures[0].reason is reason
    return err.value


def test_multi_chunk_state_reassembles_exactly():
    incoming, target = _open()
    tensor = torch.randn(5, 7)
    for chunk, piece in _chunks(tensor, chunk=64):
        incoming.accept_chunk(chunk, piece)
    incoming.accept_complete(FirstToken(1), 1, tensor.numel() * 4)
    assert torch.equal(target.written[0].tensor, tensor) and target.completed == [FirstToken(1)]
    assert incoming.state is TransferState.COMPLETE and target.failures == []


@pytest.mark.parametrize("case", ["reordered", "skipped state", "other request", "overrun",
                                  "short payload", "bad size", "no handshake twice"])
def test_bad_chunks_fail_once(case):
    incoming, target = _open()
    tensor = torch.randn(40)
    chunks = list(_chunks(tensor, chunk=64))
    if case == "reordered":
        call = lambda: incoming.accept_chunk(*chunks[1])  # noqa: E731
        reason = FailureReason.DATA_LOSS
    elif case == "skipped state":
        chunk, piece = next(_chunks(tensor, index=1))
        call = lambda: incoming.accept_chunk(chunk, piece)  # noqa: E731
        reason = FailureReason.DATA_LOSS
    elif case == "other request":
        chunk, piece = next(_chunks(tensor, request_id="someone-else"))
        call = lambda: incoming.accept_chunk(chunk, piece)  # noqa: E731
        reason = FailureReason.INVALID
    elif case == "overrun":
        chunk, piece = chunks[-1]
        incoming.accept_chunk(*chunks[0])
        incoming.accept_chunk(*chunks[1])
        bigger = ChunkDescription(chunk.state, chunk.offset, 64, chunk.checksum)
        call = lambda: incoming.accept_chunk(bigger, memoryview(bytes(64)))  # noqa: E731
        reason = FailureReason.DATA_LOSS
    elif case == "short payload":
        chunk, piece = chunks[0]
        call = lambda: incoming.accept_chunk(chunk, piece[:10])  # noqa: E731
        reason = FailureReason.DATA_LOSS
    elif case == "bad size":
        chunk, piece = chunks[0]
        wrong = StateDescription("r", 0, 0, StateKind.SSM, 0, 4, (3, 3), torch.float32, 160)
        call = lambda: incoming.accept_chunk(  # noqa: E731
            ChunkDescription(wrong, 0, chunk.length, chunk.checksum), piece)
        reason = FailureReason.DATA_LOSS
    else:
        call = lambda: incoming.accept_handshake(  # noqa: E731
            PROTOCOL_VERSION, FP, "r", 4, 0, BINDING)
        reason = FailureReason.INVALID
    _fails(incoming, target, reason, call)
    # Anything after the failure is refused with the same error, and nothing is released twice.
    with pytest.raises(TransferError):
        incoming.accept_chunk(*chunks[0])
    assert len(target.failures) == 1


def test_completion_checks_totals_and_missing_bytes():
    incoming, target = _open()
    tensor = torch.randn(40)
    chunks = list(_chunks(tensor, chunk=64))
    incoming.accept_chunk(*chunks[0])
    err = _fails(incoming, target, FailureReason.DATA_LOSS,
                 lambda: incoming.accept_complete(FirstToken(1), 1, 160))
    assert "has 64 of 160 bytes" in err.message

    incoming, target = _open()
    for chunk in chunks:
        incoming.accept_chunk(*chunk)
    _fails(incoming, target, FailureReason.DATA_LOSS,
           lambda: incoming.accept_complete(FirstToken(1), 2, 320))


def test_reservation_refusing_a_state_is_invalid():
    incoming, target = _open()
    chunk, piece = next(_chunks(torch.randn(8), layer=99))
    err = _fails(incoming, target, FailureReason.INVALID,
                 lambda: incoming.accept_chunk(chunk, piece))
    assert "layer 99" in err.message


@pytest.mark.parametrize("version, fingerprint, request_id, n, start, needle", [
    (PROTOCOL_VERSION + 1, FP, "r", 4, 2, "protocol version"),
    (PROTOCOL_VERSION, "b" * 64, "r", 4, 2, "fingerprint"),
    (PROTOCOL_VERSION, FP, "other", 4, 2, "reservation holds 'r'"),
    (PROTOCOL_VERSION, FP, "r", 5, 2, "reservation holds 4"),
    # The decode worker holds the first 2 tokens: state from 0 (or 3) is not what it waits for.
    (PROTOCOL_VERSION, FP, "r", 4, 0, "holds the first 2 tokens"),
    (PROTOCOL_VERSION, FP, "r", 4, 3, "holds the first 2 tokens"),
])
def test_handshake_mismatches_are_refused(version, fingerprint, request_id, n, start, needle):
    target = Target()
    incoming = StateReceiver(FP).expect("res-1", "r", 4, 2, target, time.time() + 30)
    err = _fails(incoming, target, FailureReason.REFUSED,
                 lambda: incoming.accept_handshake(version, fingerprint, request_id, n, start,
                                                     BINDING))
    assert needle in err.message


def test_a_binding_the_reservation_refuses_fails_the_handshake_before_any_write():
    target = Target()
    incoming = StateReceiver(FP).expect("res-1", "r", 4, 0, target, time.time() + 30)
    err = _fails(incoming, target, FailureReason.REFUSED,
                 lambda: incoming.accept_handshake(PROTOCOL_VERSION, FP, "r", 4, 0,
                                                   ReservationBinding("x" * 32, b"h" * 32)))
    assert "another reservation's token" in err.message
    assert target.bound is None and target.written == [] and target.completed == []


def test_receiver_registry():
    receiver = StateReceiver(FP)
    target = Target()
    incoming = receiver.expect("r", "r", 4, 0, target, time.time() + 30)
    assert receiver.incoming("r") is incoming and receiver.in_flight() == 1
    with pytest.raises(ValueError, match="reservation_id='r' already waits"):
        receiver.expect("r", "r", 4, 0, Target(), time.time() + 30)
    with pytest.raises(TransferError) as err:
        receiver.incoming("nobody")
    assert err.value.reason is FailureReason.NOT_FOUND
    assert receiver.cancel("r", "client left") and target.failures[0].reason is \
        FailureReason.CANCELLED
    assert receiver.in_flight() == 0 and not receiver.cancel("r", "again")
    # A sender that comes after its reservation ended (the request was cancelled on both
    # workers at once) hears why, not NOT_FOUND.
    with pytest.raises(TransferError) as err:
        receiver.incoming("r")
    assert err.value.reason is FailureReason.CANCELLED and "client left" in err.value.message
