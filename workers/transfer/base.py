"""State transfer's vocabulary: transfer states, failure reasons, typed descriptions of what
is sent, and the sender / receiver interfaces.

A transport (gRPC today, see grpc_sender / grpc_receiver) moves `LayerState`s from a prefill
worker to a decode worker. The prefill side sees a `StateSender` (a PrefillSink plus finish and
abort); the decode side registers a `ReceiveTarget` per request with a `StateReceiver`
(receiver.py), which checks, reassembles and delivers what a transport hands it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import torch
import xxhash

from baton.workers.engine import LayerState, StateKind

# Bumped whenever the meaning of anything on the wire changes; peers must agree exactly.
# 3: transfers name a reservation and start at the decode worker's cached prefix.
# 4: the handshake carries the reservation's token and the prompt's chain hash.
PROTOCOL_VERSION = 4

# Chunk payloads are bounded so one message never holds a whole long-prompt KV layer, and so a
# corrupted chunk costs one small retry unit. Large enough that per-message costs amortize.
MIN_CHUNK_BYTES = 64 << 10
MAX_CHUNK_BYTES = 4 << 20

DTYPES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float8_e4m3fn: "float8_e4m3fn",
    torch.uint8: "uint8",
    torch.int8: "int8",
    torch.int32: "int32",
    torch.int64: "int64",
}


def checksum(data) -> int:
    """XXH3-64 (seed 0) of a bytes-like object (protocol version 2's chunk checksum). The
    hash releases the GIL on large inputs, so it overlaps gRPC's own threads."""
    return xxhash.xxh3_64_intdigest(data)


class TransferState(str, Enum):
    """Where one request's transfer is, on either side."""

    PENDING = "pending"
    """Opened (sender) or reserved (receiver); no handshake accepted yet."""
    STREAMING = "streaming"
    """Handshake accepted; layer states are flowing."""
    COMPLETE = "complete"
    """Every state and the first token arrived and were acknowledged."""
    FAILED = "failed"
    """Ended by an error; the receiver released the request's reservation."""


class FailureReason(str, Enum):
    """Why a transfer failed; each maps to one gRPC status code."""

    DATA_LOSS = "data_loss"
    """A checksum, size or ordering check failed: the bytes are not what was sent."""
    DEADLINE_EXCEEDED = "deadline_exceeded"
    REFUSED = "refused"
    """The handshake did not match (protocol version, weights/config fingerprint, prompt)."""
    NOT_FOUND = "not_found"
    """No reservation of that id waits for state on the receiver."""
    INVALID = "invalid"
    """A message or state that cannot belong to this request (the reservation rejected it)."""
    UNAVAILABLE = "unavailable"
    """The peer went away or could not be reached."""
    CANCELLED = "cancelled"
    """One side gave up (client disconnect, abort, drain)."""


class TransferError(RuntimeError):
    """A failed transfer, with the reason the other side and the router act on."""

    def __init__(self, reason: FailureReason, message: str):
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class StateDescription:
    """What one layer state is, as sent ahead of its bytes."""

    request_id: str
    state_index: int
    """0, 1, ... in sending order within the request's transfer."""
    layer: int
    kind: StateKind
    token_start: int
    token_end: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    """Bytes of the C-contiguous tensor."""

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise TransferError(FailureReason.INVALID, f"dtype={self.dtype} is not one of "
                                f"{', '.join(DTYPES.values())}")
        numel = 1
        for d in self.shape:
            numel *= d
        expected = numel * self.dtype.itemsize
        if expected != self.nbytes:
            raise TransferError(FailureReason.DATA_LOSS,
                                f"state {self.state_index} (layer {self.layer} {self.kind.value}) "
                                f"shape {self.shape} {DTYPES[self.dtype]} needs {expected} "
                                f"bytes, header says {self.nbytes}")
        if not 0 <= self.token_start <= self.token_end:
            raise TransferError(FailureReason.INVALID,
                                f"token range [{self.token_start}, {self.token_end}) is empty "
                                "or negative")


@dataclass(frozen=True)
class ChunkDescription:
    """Where one chunk's bytes belong and how to check them."""

    state: StateDescription
    offset: int
    length: int
    checksum: int
    """checksum(data) of the chunk's bytes."""


@dataclass(frozen=True)
class ReservationBinding:
    """What ties a transfer to the request its reservation was made for (the handshake
    carries it; the decode worker checks it before it writes any state)."""

    token: str
    """The decode worker's ReserveResponse.reservation_token, as the Prefill presented it."""
    chain_hash: bytes
    """prompt_chain_hash of the prompt the sender prefilled, computed by the sender."""


@dataclass(frozen=True)
class FirstToken:
    """The token the prefill worker sampled, delivered with the state."""

    token_id: int
    logprob: float = 0.0
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TransferResult:
    """What the sender reports once the receiver acknowledged everything."""

    request_id: str
    num_states: int
    total_bytes: int
    bytes_by_kind: dict[str, int]
    seconds: float
    """From open to acknowledgement."""
    tail_seconds: float
    """From finish() (the prefill's last layer) to acknowledgement: what streaming left over."""


class StateSender(Protocol):
    """One request's outgoing transfer (prefill side). A PrefillSink for the engine."""

    request_id: str
    state: TransferState

    def on_layer(self, state: LayerState) -> None:
        """Queues one layer state; blocks while too many bytes wait (backpressure)."""

    def finish(self, first_token: FirstToken, cached_tokens: int = 0) -> TransferResult:
        """Sends the first token (and how many prompt tokens the sender's prefix cache
        served), waits for the receiver's acknowledgement; TransferError."""

    def abort(self, reason: str) -> None:
        """Gives up; the receiver releases the reservation. Idempotent."""


class StateTransport(Protocol):
    """Opens outgoing transfers to decode workers."""

    def open(self, target: str, reservation_id: str, request_id: str, num_prompt_tokens: int,
             token_start: int, deadline: float, binding: ReservationBinding) -> StateSender:
        """A transfer into reservation_id on target, of KV from prompt position token_start
        (what the decode worker lacks) to num_prompt_tokens. deadline: absolute time.time()
        by which the transfer must be acknowledged. binding: the reservation's token and the
        prefilled prompt's chain hash, for the handshake."""

    def close(self) -> None: ...


class ReceiveTarget(Protocol):
    """What the decode worker provides for one request it reserved room for (its
    DecodeReservation)."""

    def bind(self, token: str, chain_hash: bytes) -> None:
        """Accepts the handshake's binding, or raises ValueError (the token is not the
        reservation's, or the sender prefilled another prompt): nothing was written."""

    def write(self, state: LayerState) -> None:
        """Copies one complete layer state into the reservation (may raise ValueError)."""

    def complete(self, first_token: FirstToken, cached_tokens: int) -> None:
        """Everything arrived: commit the reservation and start decoding. cached_tokens: prompt
        tokens the sender's prefix cache served."""

    def fail(self, error: TransferError) -> None:
        """The transfer failed: release the reservation and end the request."""


def check_chunk_bytes(chunk_bytes: int) -> int:
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes={chunk_bytes} is not in {MIN_CHUNK_BYTES}.."
                         f"{MAX_CHUNK_BYTES}")
    return chunk_bytes
