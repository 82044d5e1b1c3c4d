"""The prefill side of the gRPC transport: one client-streaming TransferState call per request.

The engine thread calls `on_layer` as each layer finishes the prompt. That only brings the
tensor to host memory (if it is not there) and queues it; chunking, checksums and encoding
happen on the thread gRPC runs to consume the request iterator, so the engine goes back to
the next layer at once.
The queue is bounded in bytes: when the decode worker or the network falls behind, on_layer
blocks (backpressure) instead of buffering a whole long prompt's state.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from baton.proto.baton.decode.v1 import decode_pb2
from baton.workers.engine import LayerState
from baton.workers.metrics import BatonMetrics
from baton.workers.transfer import wire
from baton.workers.transfer.base import (
    MAX_CHUNK_BYTES,
    PROTOCOL_VERSION,
    ChunkDescription,
    FailureReason,
    FirstToken,
    ReservationBinding,
    StateDescription,
    TransferError,
    TransferResult,
    TransferState,
    check_chunk_bytes,
    checksum,
)

log = logging.getLogger(__name__)

TRANSFER_METHOD = "/baton.decode.v1.DecodeService/TransferState"

# Channel settings measured on the transfer benchmark: reading the socket in large pieces is
# what moves Python gRPC from ~1 to ~1.5 GB/s on loopback; messages may hold a whole chunk.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", 2 * MAX_CHUNK_BYTES),
    ("grpc.max_receive_message_length", 2 * MAX_CHUNK_BYTES),
    ("grpc.experimental.tcp_read_chunk_size", 4 << 20),
    ("grpc.experimental.tcp_min_read_chunk_size", 1 << 20),
    ("grpc.experimental.tcp_max_read_chunk_size", 16 << 20),
)

_STATUS_TO_REASON = {
    grpc.StatusCode.DATA_LOSS: FailureReason.DATA_LOSS,
    grpc.StatusCode.DEADLINE_EXCEEDED: FailureReason.DEADLINE_EXCEEDED,
    grpc.StatusCode.FAILED_PRECONDITION: FailureReason.REFUSED,
    grpc.StatusCode.NOT_FOUND: FailureReason.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT: FailureReason.INVALID,
    grpc.StatusCode.UNAVAILABLE: FailureReason.UNAVAILABLE,
    grpc.StatusCode.CANCELLED: FailureReason.CANCELLED,
    # The peer takes no transfers on this address (e.g. only on its TLS listener).
    grpc.StatusCode.UNIMPLEMENTED: FailureReason.REFUSED,
}


def reason_of(code: grpc.StatusCode) -> FailureReason:
    return _STATUS_TO_REASON.get(code, FailureReason.UNAVAILABLE)


@dataclass
class _Queued:
    description: StateDescription
    host: torch.Tensor
    """The state's bytes in contiguous CPU memory."""


_END = object()
# Chunk messages encoded ahead of the one gRPC is sending.
ENCODED_AHEAD = 2


class GrpcStateSender:
    """One request's outgoing transfer over DecodeService.TransferState."""

    def __init__(self, transport: GrpcTransport, channel: grpc.Channel, target: str,
                 reservation_id: str, request_id: str, num_prompt_tokens: int,
                 token_start: int, deadline: float, binding: ReservationBinding):
        self.request_id = request_id
        self.reservation_id = reservation_id
        self.target = target
        self.state = TransferState.PENDING
        self.handed: list[tuple[int, str, float]] = []
        """(layer, kind, time.time()) as the engine handed each state over."""
        self.backpressure_waits = 0
        """States whose on_layer had to wait for room in the queue (tests, logs)."""
        self._transport = transport
        self._chunk_bytes = transport.chunk_bytes
        self._max_queued = transport.max_queued_bytes
        self._metrics = transport.metrics
        self._deadline = deadline
        self._opened = time.monotonic()
        self._cond = threading.Condition()
        self._queue: deque = deque()
        self._queued_bytes = 0
        self._num_states = 0
        self._total_bytes = 0
        self._bytes_by_kind: dict[str, int] = {}
        self._failed_reported = False
        self._future: grpc.Future | None = None
        timeout = deadline - time.time()
        if timeout <= 0:
            raise TransferError(FailureReason.DEADLINE_EXCEEDED,
                                f"request {request_id}: deadline passed before the transfer")
        call = channel.stream_unary(TRANSFER_METHOD, request_serializer=None,
                                    response_deserializer=decode_pb2.TransferStateResponse
                                    .FromString)
        handshake = wire.encode_handshake(PROTOCOL_VERSION, transport.fingerprint,
                                          reservation_id, request_id, num_prompt_tokens,
                                          token_start, binding)
        self._future = call.future(self._messages(handshake), timeout=timeout,
                                   metadata=(("x-request-id", request_id),))
        self._future.add_done_callback(lambda _: self._wake())
        self.state = TransferState.STREAMING

    # -- PrefillSink ---------------------------------------------------------------------

    def on_layer(self, state: LayerState) -> None:
        handed_at = time.time()
        self.handed.append((state.layer, state.kind.value, handed_at))
        log.debug("state handed request=%s index=%d layer=%d kind=%s at=%.6f",
                  self.request_id, len(self.handed) - 1, state.layer, state.kind.value,
                  handed_at)
        if self._call_done():
            # The receiver ended the call (refused, data loss, deadline): the engine stops
            # this prefill instead of computing state nobody takes.
            raise self._fail(self._call_error())
        # The engine hands over tensors it keeps no reference to (cache.read_state returns
        # copies), so a contiguous CPU tensor is queued as it is; device tensors come to host
        # memory here, on the engine thread, while the device still holds them.
        host = state.tensor.detach().to("cpu").contiguous()
        desc = StateDescription(
            request_id=self.request_id, state_index=self._num_states, layer=state.layer,
            kind=state.kind, token_start=state.token_start, token_end=state.token_end,
            shape=tuple(host.shape), dtype=host.dtype, nbytes=host.numel() * host.element_size())
        desc.validate()
        self._num_states += 1
        self._total_bytes += desc.nbytes
        with self._cond:
            # Backpressure: wait while the queue is over its byte budget (an empty queue
            # always takes one state, however large).
            waited = False
            while (self._queue and self._queued_bytes + desc.nbytes > self._max_queued
                   and not self._call_done()):
                if not waited:
                    waited = True
                    self.backpressure_waits += 1
                self._cond.wait(timeout=0.1)
            self._queue.append(_Queued(desc, host))
            self._queued_bytes += desc.nbytes
            self._cond.notify_all()

    # -- StateSender -------------------------------------------------------------------------

    def finish(self, first_token: FirstToken, cached_tokens: int = 0) -> TransferResult:
        finished_at = time.monotonic()
        with self._cond:
            self._queue.append(wire.encode_complete(first_token, self._num_states,
                                                    self._total_bytes, cached_tokens))
            self._queue.append(_END)
            self._cond.notify_all()
        try:
            self._future.result(timeout=max(0.0, self._deadline - time.time()) + 5.0)
        except grpc.FutureTimeoutError:
            self._future.cancel()
            raise self._fail(TransferError(FailureReason.DEADLINE_EXCEEDED,
                                           f"request {self.request_id}: no acknowledgement "
                                           "by the deadline")) from None
        except (grpc.FutureCancelledError, grpc.RpcError):
            raise self._fail(self._call_error()) from None
        now = time.monotonic()
        self.state = TransferState.COMPLETE
        if self._metrics is not None:
            self._metrics.state_transfer_seconds.observe(now - self._opened)
        return TransferResult(self.request_id, self._num_states, self._total_bytes,
                              dict(self._bytes_by_kind), now - self._opened, now - finished_at)

    def abort(self, reason: str) -> None:
        if self.state in (TransferState.COMPLETE, TransferState.FAILED):
            return
        self._future.cancel()
        with self._cond:
            self._queue.clear()
            self._queue.append(_END)
            self._cond.notify_all()
        self._fail(TransferError(FailureReason.CANCELLED, f"request {self.request_id}: "
                                 f"{reason}"))

    # -- internals -----------------------------------------------------------------------

    def _fail(self, error: TransferError) -> TransferError:
        self.state = TransferState.FAILED
        if not self._failed_reported:
            self._failed_reported = True
            if self._metrics is not None:
                self._metrics.state_transfer_failures.inc()
        return error

    def _call_error(self) -> TransferError:
        """What ended the (done) call, as a TransferError."""
        if self._future.cancelled():
            return TransferError(FailureReason.CANCELLED, f"request {self.request_id}: aborted")
        error = self._future.exception()
        if error is None:
            return TransferError(FailureReason.INVALID, f"request {self.request_id}: the "
                                 "receiver acknowledged before the transfer finished")
        # The status code only: the receiver's text is never relayed (a decode_target that is
        # not a decode worker must not be able to speak through this one).
        code = error.code()
        return TransferError(reason_of(code), f"request {self.request_id} to {self.target}: "
                             f"the decode worker answered {code.name}")

    def _call_done(self) -> bool:
        # The iterator may run before call.future() has returned the future.
        return self._future is not None and self._future.done()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _messages(self, handshake: bytes):
        """The request stream gRPC consumes on its own thread.

        gRPC sends one message at a time and waits for it to be written before asking for the
        next, so checksums and encoding run one stage ahead on the encoder thread: the next
        chunk is ready while the previous one is on the wire."""
        yield handshake
        ready: queue.Queue = queue.Queue(maxsize=ENCODED_AHEAD)
        encoder = threading.Thread(target=self._encode, args=(ready,), daemon=True,
                                   name=f"baton-encode-{self.request_id[:16]}")
        encoder.start()
        while True:
            try:
                item = ready.get(timeout=0.1)
            except queue.Empty:
                if self._call_done():
                    return
                continue
            if item is _END:
                return
            message, kind, nbytes = item
            yield message
            if kind is not None:
                self._bytes_by_kind[kind] = self._bytes_by_kind.get(kind, 0) + nbytes
                if self._metrics is not None:
                    self._metrics.state_transfer_bytes(kind, nbytes)

    def _encode(self, ready: queue.Queue) -> None:
        """Encoder thread: queued states -> chunk messages, in order, into `ready`."""

        def put(item) -> bool:
            while not self._call_done():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        while True:
            with self._cond:
                while not self._queue:
                    if self._call_done():
                        return
                    self._cond.wait(timeout=0.1)
                item = self._queue.popleft()
            if item is _END:
                put(_END)
                return
            if isinstance(item, bytes):
                if not put((item, None, 0)):
                    return
                continue
            for message, nbytes in self._chunks(item):
                if not put((message, item.description.kind.value, nbytes)):
                    return
            with self._cond:
                self._queued_bytes -= item.description.nbytes
                self._cond.notify_all()

    def _chunks(self, item: _Queued):
        desc = item.description
        data = wire.tensor_bytes(item.host)
        for offset in range(0, max(desc.nbytes, 1), self._chunk_bytes):
            piece = data[offset:offset + self._chunk_bytes]
            chunk = ChunkDescription(desc, offset, len(piece), checksum(piece))
            yield self._transport.tamper(chunk, wire.encode_chunk(chunk, piece)), len(piece)


class GrpcTransport:
    """Opens TransferState calls to decode workers, one cached channel per target.

    chunk_bytes defaults to the largest chunk: a layer state that fits in one chunk (SSM
    states, KV of prompts up to a few thousand tokens) is viewed in place by the receiver,
    and fewer, larger messages cost gRPC less per byte."""

    def __init__(self, fingerprint: str, metrics: BatonMetrics | None = None,
                 chunk_bytes: int = MAX_CHUNK_BYTES, max_queued_bytes: int = 64 << 20,
                 channel_credentials: grpc.ChannelCredentials | None = None,
                 server_name: str | None = None,
                 resolve: Callable[[str], str] | None = None):
        """channel_credentials: TLS for every transfer (None: plaintext). server_name: the
        name to expect in the decode workers' certificates when it is not their address.
        resolve: maps a decode worker's address to the address of its transfer listener
        (e.g. a separate TLS port); raises TransferError when it cannot."""
        self.fingerprint = fingerprint
        self.metrics = metrics
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)
        if max_queued_bytes < chunk_bytes:
            raise ValueError(f"max_queued_bytes={max_queued_bytes} must be >= chunk_bytes="
                             f"{chunk_bytes}")
        self.max_queued_bytes = max_queued_bytes
        self._credentials = channel_credentials
        self._options = CHANNEL_OPTIONS + (
            (("grpc.ssl_target_name_override", server_name),) if server_name else ())
        self._resolve = resolve
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def open(self, target: str, reservation_id: str, request_id: str, num_prompt_tokens: int,
             token_start: int, deadline: float, binding: ReservationBinding) -> GrpcStateSender:
        if not reservation_id:
            raise ValueError("reservation_id is required: the decode worker's Reserve answer "
                             "names the reservation the state is for")
        if not binding.token:
            raise ValueError("reservation_token is required: the decode worker's Reserve "
                             "answer gives it, and refuses a transfer without it")
        return GrpcStateSender(self, self._channel(target), target, reservation_id,
                               request_id, num_prompt_tokens, token_start, deadline, binding)

    def close(self) -> None:
        with self._lock:
            channels, self._channels = self._channels, {}
        for channel in channels.values():
            channel.close()

    def tamper(self, chunk: ChunkDescription, message: bytes) -> bytes:
        """The message as sent. A hook for fault-injection tests; the identity here."""
        return message

    def _channel(self, target: str) -> grpc.Channel:
        if not target or ":" not in target:
            raise ValueError(f"decode_target={target!r} must be host:port")
        with self._lock:
            channel = self._channels.get(target)
        if channel is not None:
            return channel
        address = self._resolve(target) if self._resolve is not None else target
        if self._credentials is not None:
            channel = grpc.secure_channel(address, self._credentials, options=self._options)
        else:
            channel = grpc.insecure_channel(address, options=self._options)
        with self._lock:
            if target in self._channels:  # another request raced us to it
                channel.close()
                return self._channels[target]
            self._channels[target] = channel
            return channel

    def forget(self, target: str) -> None:
        """Drops the channel to target (its worker went away; resolve it afresh next time)."""
        with self._lock:
            channel = self._channels.pop(target, None)
        if channel is not None:
            channel.close()
