"""The transport-independent decode side: which transfers a worker waits for, and the checks
every incoming message passes (handshake, binding, order, sizes, checksums, deadline) before
its state reaches the reservation. A transport only decodes messages and calls
IncomingTransfer, so another transport gets every check for free.

The handshake is checked in full before the transfer may write anything: the peer's protocol
and fingerprint, the request, the prompt length and start, and then the binding (the
reservation's token and the chain hash of the prompt the sender prefilled), which the
reservation itself checks (ReceiveTarget.bind: DecodeReservation OPEN -> RECEIVING). A
transfer whose binding is refused fails with REFUSED having written nothing.

Deadlines: every transfer's deadline is an entry on one heap (baton.workers.deadlines), not a
thread each.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from baton.workers.deadlines import Deadlines
from baton.workers.engine import LayerState
from baton.workers.metrics import BatonMetrics
from baton.workers.transfer.base import (
    PROTOCOL_VERSION,
    ChunkDescription,
    FailureReason,
    FirstToken,
    ReceiveTarget,
    ReservationBinding,
    StateDescription,
    TransferError,
    TransferState,
    checksum,
)

log = logging.getLogger(__name__)


@dataclass
class _Assembly:
    """A layer state whose chunks are arriving."""

    description: StateDescription
    received: int = 0
    buffer: torch.Tensor | None = None
    """uint8 [nbytes]; allocated when the state spans several chunks."""
    single: torch.Tensor | None = None
    """The one chunk's bytes viewed in place, when the state fits in one chunk."""


@dataclass
class ArrivalRecord:
    """When a layer state finished arriving (time.time(), comparable across processes)."""

    state_index: int
    layer: int
    kind: str
    nbytes: int
    at: float


class IncomingTransfer:
    """One request's incoming transfer: checks each message and feeds the ReceiveTarget.

    Transports call accept_handshake, accept_chunk (any number), then accept_complete; any
    check that fails raises TransferError after failing the transfer (which releases the
    reservation through the target exactly once).
    """

    def __init__(self, receiver: StateReceiver, reservation_id: str, request_id: str,
                 num_prompt_tokens: int, token_start: int, target: ReceiveTarget,
                 deadline: float):
        self.reservation_id = reservation_id
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.token_start = token_start
        self.deadline = deadline
        self.state = TransferState.PENDING
        self.error: TransferError | None = None
        self.arrivals: list[ArrivalRecord] = []
        self.bytes_received = 0
        self.states_received = 0
        self.started_at = time.monotonic()
        self._receiver = receiver
        self._target = target
        self._lock = threading.RLock()
        self._done = threading.Event()
        self._assembly: _Assembly | None = None
        self._on_fail: list[Callable[[], None]] = []
        self._deadline = receiver.deadlines.at(deadline, self._expire)

    # -- transport-facing ------------------------------------------------------------------

    def add_fail_callback(self, callback: Callable[[], None]) -> None:
        """Runs callback if the transfer fails (a transport ends its stream with it)."""
        with self._lock:
            if self.state is TransferState.FAILED:
                callback()
            else:
                self._on_fail.append(callback)

    def accept_handshake(self, protocol_version: int, fingerprint: str, request_id: str,
                         num_prompt_tokens: int, token_start: int,
                         binding: ReservationBinding) -> None:
        with self._lock:
            self._expect_state(TransferState.PENDING, "handshake")
            if protocol_version != PROTOCOL_VERSION:
                self._raise(FailureReason.REFUSED, f"protocol version {protocol_version}, this "
                            f"worker speaks {PROTOCOL_VERSION}")
            if fingerprint != self._receiver.fingerprint:
                self._raise(FailureReason.REFUSED, f"peer fingerprint {fingerprint[:16]}... "
                            f"differs from this worker's {self._receiver.fingerprint[:16]}... "
                            "(different weights, model config or state dtypes)")
            if request_id != self.request_id:
                self._raise(FailureReason.REFUSED, f"peer sends request {request_id!r}, the "
                            f"reservation holds {self.request_id!r}")
            if num_prompt_tokens != self.num_prompt_tokens:
                self._raise(FailureReason.REFUSED, f"peer prefilled {num_prompt_tokens} tokens, "
                            f"the reservation holds {self.num_prompt_tokens}")
            if token_start != self.token_start:
                self._raise(FailureReason.REFUSED, f"peer sends state from token {token_start}, "
                            f"the reservation holds the first {self.token_start} tokens")
            try:
                self._target.bind(binding.token, binding.chain_hash)
            except ValueError as e:
                self._raise(FailureReason.REFUSED, f"the reservation refused the handshake: {e}")
            self.state = TransferState.STREAMING

    def accept_chunk(self, chunk: ChunkDescription, data: memoryview) -> None:
        """Checks one chunk and, when it completes a layer state, writes that state."""
        with self._lock:
            self._expect_state(TransferState.STREAMING, "chunk")
            desc = chunk.state
            if desc.request_id != self.request_id:
                self._raise(FailureReason.INVALID, f"chunk of request {desc.request_id!r} on "
                            f"the transfer of {self.request_id!r}")
            if len(data) != chunk.length:
                self._raise(FailureReason.DATA_LOSS, f"chunk at {chunk.offset} of state "
                            f"{desc.state_index}: {len(data)} bytes, header says {chunk.length}")
            if checksum(data) != chunk.checksum:
                self._raise(FailureReason.DATA_LOSS, f"checksum mismatch in state "
                            f"{desc.state_index} (layer {desc.layer} {desc.kind.value}) at "
                            f"byte {chunk.offset}")
            assembly = self._assembly
            if assembly is None:
                if desc.state_index != self.states_received or chunk.offset != 0:
                    self._raise(FailureReason.DATA_LOSS, f"expected state "
                                f"{self.states_received} from byte 0, got state "
                                f"{desc.state_index} at byte {chunk.offset}")
                try:
                    desc.validate()
                except TransferError as e:
                    self._raise(e.reason, e.message)
                assembly = self._assembly = _Assembly(desc)
            elif desc != assembly.description or chunk.offset != assembly.received:
                self._raise(FailureReason.DATA_LOSS, f"expected state "
                            f"{assembly.description.state_index} at byte {assembly.received}, "
                            f"got state {desc.state_index} at byte {chunk.offset}")
            if chunk.offset + chunk.length > desc.nbytes:
                self._raise(FailureReason.DATA_LOSS, f"chunk at {chunk.offset} of "
                            f"{chunk.length} bytes overruns state {desc.state_index} "
                            f"({desc.nbytes} bytes)")
            if chunk.length == desc.nbytes:
                assembly.single = bytes_as_tensor(data)
            else:
                if assembly.buffer is None:
                    assembly.buffer = torch.empty(desc.nbytes, dtype=torch.uint8)
                # A plain single-threaded memcpy: torch's parallel copy only contends with
                # the gRPC threads for the same cores.
                end = chunk.offset + chunk.length
                assembly.buffer.numpy()[chunk.offset:end] = np.frombuffer(data, np.uint8)
            assembly.received += chunk.length
            self.bytes_received += chunk.length
            if assembly.received == desc.nbytes:
                self._deliver(assembly)

    def accept_complete(self, first_token: FirstToken, num_states: int, total_bytes: int,
                        cached_tokens: int = 0) -> None:
        with self._lock:
            self._expect_state(TransferState.STREAMING, "completion")
            if self._assembly is not None:
                d = self._assembly.description
                self._raise(FailureReason.DATA_LOSS, f"completion while state {d.state_index} "
                            f"has {self._assembly.received} of {d.nbytes} bytes")
            if (num_states, total_bytes) != (self.states_received, self.bytes_received):
                self._raise(FailureReason.DATA_LOSS, f"sender sent {num_states} states / "
                            f"{total_bytes} bytes, {self.states_received} / "
                            f"{self.bytes_received} arrived")
            try:
                self._target.complete(first_token, cached_tokens)
            except ValueError as e:
                self._raise(FailureReason.INVALID, f"the reservation refused the state: {e}")
            except Exception as e:  # the receiving engine stopped or failed
                self._raise(FailureReason.UNAVAILABLE, f"the receiver could not commit: {e}")
            self.state = TransferState.COMPLETE
            self._finish()

    def fail(self, error: TransferError) -> bool:
        """Fails the transfer unless it already ended; releases the reservation once.

        Returns whether this call failed it."""
        with self._lock:
            if self.state in (TransferState.COMPLETE, TransferState.FAILED):
                return False
            self.state = TransferState.FAILED
            self.error = error
            callbacks, self._on_fail = self._on_fail, []
            self._assembly = None
            self._finish()
        self._receiver.count_failure()
        try:
            self._target.fail(error)
        finally:
            for callback in callbacks:
                callback()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the transfer completed or failed; returns whether it ended."""
        return self._done.wait(timeout)

    # -- internals ---------------------------------------------------------------------------

    def _deliver(self, assembly: _Assembly) -> None:
        d = assembly.description
        raw = assembly.single if assembly.single is not None else assembly.buffer
        tensor = raw.view(d.dtype).reshape(d.shape)
        state = LayerState(layer=d.layer, kind=d.kind, token_start=d.token_start,
                           token_end=d.token_end, tensor=tensor)
        try:
            self._target.write(state)
        except ValueError as e:
            self._raise(FailureReason.INVALID, f"the reservation refused state "
                        f"{d.state_index} (layer {d.layer} {d.kind.value}): {e}")
        except Exception as e:  # the receiving engine stopped or failed
            self._raise(FailureReason.UNAVAILABLE, f"the receiver could not store state "
                        f"{d.state_index} (layer {d.layer} {d.kind.value}): {e}")
        self._assembly = None
        self.states_received += 1
        record = ArrivalRecord(d.state_index, d.layer, d.kind.value, d.nbytes, time.time())
        self.arrivals.append(record)
        log.debug("state arrived request=%s index=%d layer=%d kind=%s bytes=%d at=%.6f",
                  self.request_id, record.state_index, record.layer, record.kind,
                  record.nbytes, record.at)

    def _expect_state(self, expected: TransferState, what: str) -> None:
        if self.state is TransferState.FAILED:
            raise self.error
        if self.state is not expected:
            self._raise(FailureReason.INVALID, f"{what} arrived while the transfer is "
                        f"{self.state.value}")

    def _raise(self, reason: FailureReason, message: str):
        error = TransferError(reason, f"request {self.request_id}: {message}")
        self.fail(error)
        raise error

    def _expire(self) -> None:
        self.fail(TransferError(FailureReason.DEADLINE_EXCEEDED,
                                f"request {self.request_id}: state incomplete at the deadline "
                                f"({self.states_received} states arrived)"))

    def _finish(self) -> None:
        self._deadline.cancel()
        self._receiver.forget(self.reservation_id, self)
        self._done.set()


# Received payloads are immutable bytes viewed in place; the tensors over them are only read
# (copied into the cache), so torch's warning about non-writable buffers does not apply.
# (warnings.catch_warnings per call would not be thread-safe with concurrent transfers.)
warnings.filterwarnings("ignore", message="The given buffer is not writable",
                        category=UserWarning)


def bytes_as_tensor(data: memoryview) -> torch.Tensor:
    """A uint8 tensor over data without copying (read-only: only ever copied from)."""
    if len(data) == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(data, dtype=torch.uint8)


class StateReceiver:
    """The decode side's registry of transfers it waits for, by reservation id.

    The reservation exists before the router starts the prefill (DecodeService.Reserve), so a
    transfer that finds none is refused at once: there is nothing to wait for."""

    # Ended transfers remembered, so that a sender arriving after its reservation ended (the
    # request was cancelled on both workers at once) hears why instead of NOT_FOUND.
    ENDED_REMEMBERED = 4096

    def __init__(self, fingerprint: str, metrics: BatonMetrics | None = None,
                 deadlines: Deadlines | None = None):
        self.fingerprint = fingerprint
        self.metrics = metrics
        self.deadlines = (Deadlines("baton-transfer-deadlines") if deadlines is None
                          else deadlines)
        """The one heap every transfer's deadline is on (shared with the reservations')."""
        self._incoming: dict[str, IncomingTransfer] = {}
        self._ended: OrderedDict[str, TransferError | None] = OrderedDict()
        self._lock = threading.Lock()

    def expect(self, reservation_id: str, request_id: str, num_prompt_tokens: int,
               token_start: int, target: ReceiveTarget, deadline: float) -> IncomingTransfer:
        """Registers a reservation that waits for the state of tokens [token_start,
        num_prompt_tokens) until deadline (time.time())."""
        with self._lock:
            if reservation_id in self._incoming:
                raise ValueError(f"reservation_id={reservation_id!r} already waits for a "
                                 "transfer")
            incoming = IncomingTransfer(self, reservation_id, request_id, num_prompt_tokens,
                                        token_start, target, deadline)
            self._incoming[reservation_id] = incoming
            return incoming

    def incoming(self, reservation_id: str) -> IncomingTransfer:
        """The waiting transfer of a reservation; TransferError(NOT_FOUND) if none waits."""
        with self._lock:
            incoming = self._incoming.get(reservation_id)
            ended = reservation_id in self._ended
            error = self._ended.get(reservation_id)
        if incoming is not None:
            return incoming
        if ended and error is None:
            raise TransferError(FailureReason.INVALID, f"reservation {reservation_id!r} "
                                "already received its state")
        if ended:
            raise TransferError(error.reason, f"reservation {reservation_id!r} ended before "
                                f"this transfer: {error.message}")
        raise TransferError(FailureReason.NOT_FOUND, f"no reservation {reservation_id!r} "
                            "waits for state (unknown, released or expired)")

    def cancel(self, reservation_id: str, message: str) -> bool:
        """Fails the waiting transfer of a reservation (if any); whether one was failed."""
        with self._lock:
            incoming = self._incoming.get(reservation_id)
        if incoming is None:
            return False
        return incoming.fail(TransferError(FailureReason.CANCELLED,
                                           f"request {incoming.request_id}: {message}"))

    def in_flight(self) -> int:
        with self._lock:
            return len(self._incoming)

    def forget(self, reservation_id: str, incoming: IncomingTransfer) -> None:
        with self._lock:
            if self._incoming.get(reservation_id) is incoming:
                del self._incoming[reservation_id]
                self._ended[reservation_id] = incoming.error
                while len(self._ended) > self.ENDED_REMEMBERED:
                    self._ended.popitem(last=False)

    def count_failure(self) -> None:
        if self.metrics is not None:
            self.metrics.state_transfer_failures.inc()
