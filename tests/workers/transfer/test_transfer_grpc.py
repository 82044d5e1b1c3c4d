"""State transfer over a real gRPC channel on 127.0.0.1 with synthetic layer states."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest
import torch

from baton.workers.engine import LayerState, StateKind
from baton.workers.metrics import BatonMetrics, MetricLabels
from baton.workers.transfer import (
    CHANNEL_OPTIONS,
    FailureReason,
    FirstToken,
    GrpcTransport,
    ReservationBinding,
    StateReceiver,
    TransferError,
    TransferState,
    TransferStateHandler,
)

FINGERPRINT = "f" * 64
# What a Prefill presents (the reservation's token and its prompt's chain hash).
BINDING = ReservationBinding("t" * 32, b"h" * 32)


class RecordingTarget:
    """A reservation stand-in that records what it gets and whether it was released."""

    def __init__(self, block_writes: threading.Event | None = None):
        self.states: list[LayerState] = []
        self.first_token: FirstToken | None = None
        self.error: TransferError | None = None
        self.released = threading.Event()
        self.completed = threading.Event()
        self._block = block_writes
        self.bound: tuple[str, bytes] | None = None

    def bind(self, token: str, chain_hash: bytes) -> None:
        self.bound = (token, chain_hash)

    def write(self, state: LayerState) -> None:
        if self._block is not None:
            self._block.wait(60)
        # The received tensor views the message bytes; keep a private copy like a cache does.
        self.states.append(LayerState(state.layer, state.kind, state.token_start,
                                      state.token_end, state.tensor.clone()))

    def complete(self, first_token: FirstToken, cached_tokens: int = 0) -> None:
        self.first_token = first_token
        self.cached_tokens = cached_tokens
        self.completed.set()

    def fail(self, error: TransferError) -> None:
        self.error = error
        self.released.set()


@pytest.fixture
def decode_side():
    receiver = StateReceiver(FINGERPRINT)
    server = grpc.server(futures.ThreadPoolExecutor(4), options=CHANNEL_OPTIONS)
    handler = grpc.method_handlers_generic_handler(
        "baton.decode.v1.DecodeService",
        {"TransferState": TransferStateHandler(receiver).method_handler()})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiver, f"127.0.0.1:{port}"
    server.stop(grace=None)


def _metrics() -> BatonMetrics:
    return BatonMetrics(MetricLabels("ns", "m", "prefill", "p"))


def _states(seed: int = 0) -> list[LayerState]:
    g = torch.Generator().manual_seed(seed)
    return [
        LayerState(0, StateKind.CONV, 0, 37, torch.randn(24, 3, generator=g)),
        LayerState(0, StateKind.SSM, 0, 37, torch.randn(4, 8, 16, generator=g)),
        # 37 tokens of bf16 KV spanning several 64 KiB chunks, not a multiple of the chunk.
        LayerState(1, StateKind.KV, 0, 37,
                   torch.randn(2, 37, 4, 300, generator=g).to(torch.bfloat16)),
        # A non-contiguous source tensor: the sender must send its logical layout.
        LayerState(2, StateKind.MTP_KV, 0, 36, torch.randn(2, 4, 36, 8, generator=g)
                   .transpose(1, 2)),
        LayerState(3, StateKind.HIDDEN, 36, 37, torch.randn(48, generator=g)),
    ]


def _deadline(seconds: float = 60.0) -> float:
    return time.time() + seconds


def _wait_for(condition, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.005)  # a bounded poll for the asserted state


def _read_counter(metrics: BatonMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(
        name, {"namespace": "ns", "model": "m", "role": "prefill", "pool": "p", **labels})
    return 0.0 if value is None else value


def test_round_trip_is_exact_and_metered(decode_side):
    receiver, address = decode_side
    target = RecordingTarget()
    incoming = receiver.expect("r1", "r1", 37, 0, target, _deadline())
    metrics = _metrics()
    transport = GrpcTransport(FINGERPRINT, metrics=metrics, chunk_bytes=64 << 10)
    sender = transport.open(address, "r1", "r1", 37, 0, _deadline(), BINDING)
    sent = _states()
    for state in sent:
        sender.on_layer(state)
    result = sender.finish(FirstToken(42, -0.5, ((42, -0.5), (7, -1.25))))
    transport.close()

    assert incoming.wait(60) and incoming.state is TransferState.COMPLETE
    assert sender.state is TransferState.COMPLETE
    assert target.first_token == FirstToken(42, -0.5, ((42, -0.5), (7, -1.25)))
    assert not target.released.is_set() and receiver.in_flight() == 0
    assert len(target.states) == len(sent)
    for got, want in zip(target.states, sent):
        assert (got.layer, got.kind, got.token_start, got.token_end) == \
            (want.layer, want.kind, want.token_start, want.token_end)
        assert got.tensor.dtype == want.tensor.dtype
        assert torch.equal(got.tensor, want.tensor.contiguous())
    nbytes = {k.value: sum(s.tensor.numel() * s.tensor.element_size() for s in sent
                           if s.kind is k) for k in StateKind}
    assert result.total_bytes == sum(nbytes.values()) == incoming.bytes_received
    assert result.num_states == len(sent)
    assert result.bytes_by_kind == {k: v for k, v in nbytes.items() if v}
    for kind, n in nbytes.items():
        assert _read_counter(metrics, "baton_state_transfer_bytes_total", kind=kind) == n
    assert _read_counter(metrics, "baton_state_transfer_seconds_count") == 1
    assert _read_counter(metrics, "baton_state_transfer_failures_total") == 0


def test_a_transfer_into_a_cached_prefix_names_its_reservation_and_start(decode_side):
    """The decode worker holds the first 20 tokens: the transfer of reservation "res-9"
    starts there, and its completion carries the prefill side's own cached tokens."""
    receiver, address = decode_side
    target = RecordingTarget()
    incoming = receiver.expect("res-9", "r9x", 37, 20, target, _deadline())
    sender = GrpcTransport(FINGERPRINT).open(address, "res-9", "r9x", 37, 20, _deadline(), BINDING)
    g = torch.Generator().manual_seed(3)
    sender.on_layer(LayerState(1, StateKind.KV, 20, 37, torch.randn(2, 17, 4, 8, generator=g)))
    result = sender.finish(FirstToken(5), cached_tokens=31)
    assert incoming.wait(60) and incoming.state is TransferState.COMPLETE
    assert target.cached_tokens == 31 and result.num_states == 1
    assert [(s.token_start, s.token_end) for s in target.states] == [(20, 37)]
    # A sender that does not know what the reservation holds is refused at the handshake.
    other = RecordingTarget()
    receiver.expect("res-10", "r10x", 37, 20, other, _deadline())
    sender = GrpcTransport(FINGERPRINT).open(address, "res-10", "r10x", 37, 0, _deadline(), BINDING)
    with pytest.raises(TransferError) as err:
        sender.finish(FirstToken(5))
    assert err.value.reason is FailureReason.REFUSED
    assert other.released.is_set() and "first 20 tokens" in other.error.message


def test_states_stream_before_the_prefill_ends(decode_side):
    receiver, address = decode_side
    target = RecordingTarget()
    incoming = receiver.expect("r2", "r2", 37, 0, target, _deadline())
    sender = GrpcTransport(FINGERPRINT).open(address, "r2", "r2", 37, 0, _deadline(), BINDING)
    states = _states()
    sender.on_layer(states[0])
    # Layer 0's state must be whole on the receiver before the sender has seen layer 1.
    _wait_for(lambda: incoming.arrivals)
    assert [a.state_index for a in incoming.arrivals] == [0]
    for state in states[1:]:
        sender.on_layer(state)
    sender.finish(FirstToken(1))
    assert incoming.arrivals[0].at < sender.handed[1][2]
    assert [a.layer for a in incoming.arrivals] == [s.layer for s in states]


class CorruptingTransport(GrpcTransport):
    """Flips one payload byte of the chosen chunk after its checksum was computed."""

    def __init__(self, *args, corrupt_chunk: tuple[int, int], **kwargs):
        super().__init__(*args, **kwargs)
        self.corrupt_chunk = corrupt_chunk

    def tamper(self, chunk, message):
        if (chunk.state.state_index, chunk.offset) == self.corrupt_chunk:
            corrupted = bytearray(message)
            corrupted[-1] ^= 0x40
            return bytes(corrupted)
        return message


def test_corrupted_chunk_is_data_loss_and_released(decode_side):
    receiver, address = decode_side
    target = RecordingTarget()
    incoming = receiver.expect("r3", "r3", 37, 0, target, _deadline())
    metrics = _metrics()
    transport = CorruptingTransport(FINGERPRINT, metrics=metrics, chunk_bytes=64 << 10,
                                    corrupt_chunk=(2, 64 << 10))
    sender = transport.open(address, "r3", "r3", 37, 0, _deadline(), BINDING)
    with pytest.raises(TransferError) as err:
        # Once the receiver refused the chunk, the next on_layer raises (the engine then
        # stops the prefill), else finish does.
        for state in _states():
            sender.on_layer(state)
        sender.finish(FirstToken(1))
    assert err.value.reason is FailureReason.DATA_LOSS
    assert target.released.wait(60)
    assert target.error.reason is FailureReason.DATA_LOSS and "checksum" in target.error.message
    assert target.first_token is None and incoming.state is TransferState.FAILED
    # Only the states before the corrupted one were written.
    assert [s.layer for s in target.states] == [0, 0]
    assert receiver.in_flight() == 0
    assert _read_counter(metrics, "baton_state_transfer_failures_total") == 1


def test_stall_past_deadline_fails_and_releases(decode_side):
    receiver, address = decode_side
    target = RecordingTarget()
    incoming = receiver.expect("r4", "r4", 37, 0, target, _deadline(0.8))
    # The sender would wait longer: the receiver's own deadline must end it.
    sender = GrpcTransport(FINGERPRINT).open(address, "r4", "r4", 37, 0, _deadline(3.0), BINDING)
    sender.on_layer(_states()[0])
    # The prefill stalls here: no more layers, no finish.
    assert incoming.wait(60)
    assert incoming.state is TransferState.FAILED
    assert target.released.is_set()
    assert target.error.reason is FailureReason.DEADLINE_EXCEEDED
    with pytest.raises(TransferError) as err:
        sender.finish(FirstToken(1))
    assert err.value.reason in (FailureReason.DEADLINE_EXCEEDED, FailureReason.CANCELLED)
    assert sender.state is TransferState.FAILED


def test_sender_deadline_first_still_reads_as_deadline(decode_side):
    receiver, address = decode_side
    target = RecordingTarget()
    incoming = receiver.expect("r4b", "r4b", 37, 0, target, _deadline(0.6))
    sender = GrpcTransport(FINGERPRINT).open(address, "r4b", "r4b", 37, 0, _deadline(0.6), BINDING)
    sender.on_layer(_states()[0])
    assert incoming.wait(60) and target.released.is_set()
    assert target.error.reason is FailureReason.DEADLINE_EXCEEDED


def test_fingerprint_mismatch_is_refused(decode_side):
    receiver, address = decode_side
    target = RecordingTarget()
    receiver.expect("r5", "r5", 37, 0, target, _deadline())
    sender = GrpcTransport("0" * 64).open(address, "r5", "r5", 37, 0, _deadline(), BINDING)
    assert target.released.wait(60) and target.states == []
    assert target.error.reason is FailureReason.REFUSED
    _wait_for(lambda: sender._call_done())
    with pytest.raises(TransferError) as err:
        sender.on_layer(_states()[0])
    assert err.value.reason is FailureReason.REFUSED
    assert "fingerprint" in target.error.message
    with pytest.raises(TransferError) as err:
        sender.finish(FirstToken(1))
    assert err.value.reason is FailureReason.REFUSED


def test_prompt_length_mismatch_is_refused(decode_side):
    receiver, address = decode_side
    target = RecordingTarget()
    receiver.expect("r5b", "r5b", 37, 0, target, _deadline())
    sender = GrpcTransport(FINGERPRINT).open(address, "r5b", "r5b", 36, 0, _deadline(), BINDING)
    with pytest.raises(TransferError) as err:
        sender.finish(FirstToken(1))
    assert err.value.reason is FailureReason.REFUSED
    assert target.released.wait(60)


def test_unknown_request_is_not_found(decode_side):
    _, address = decode_side
    sender = GrpcTransport(FINGERPRINT).open(address, "nobody", "nobody", 37, 0, _deadline(),
                                             BINDING)
    with pytest.raises(TransferError) as err:
        sender.finish(FirstToken(1))
    assert err.value.reason is FailureReason.NOT_FOUND


def test_sender_abort_releases_the_receiver(decode_side):
    receiver, address = decode_side
    target = RecordingTarget()
    incoming = receiver.expect("r6", "r6", 37, 0, target, _deadline())
    sender = GrpcTransport(FINGERPRINT).open(address, "r6", "r6", 37, 0, _deadline(), BINDING)
    sender.on_layer(_states()[0])
    _wait_for(lambda: incoming.arrivals)  # mid-transfer: the receiver holds a layer
    sender.abort("prefill failed")
    assert incoming.wait(60) and incoming.state is TransferState.FAILED
    assert target.released.is_set()


def test_receiver_cancel_releases_and_ends_the_call(decode_side):
    receiver, address = decode_side
    target = RecordingTarget()
    receiver.expect("r7", "r7", 37, 0, target, _deadline())
    sender = GrpcTransport(FINGERPRINT).open(address, "r7", "r7", 37, 0, _deadline(), BINDING)
    sender.on_layer(_states()[0])
    assert receiver.cancel("r7", "client disconnected")
    assert target.error.reason is FailureReason.CANCELLED
    with pytest.raises(TransferError):
        sender.finish(FirstToken(1))
    assert not receiver.cancel("r7", "again")


def test_backpressure_blocks_the_engine_thread(decode_side):
    receiver, address = decode_side
    unblock = threading.Event()
    target = RecordingTarget(block_writes=unblock)
    receiver.expect("r8", "r8", 64, 0, target, _deadline())
    transport = GrpcTransport(FINGERPRINT, chunk_bytes=1 << 20, max_queued_bytes=1 << 20)
    sender = transport.open(address, "r8", "r8", 64, 0, _deadline(), BINDING)
    big = [LayerState(i, StateKind.KV, 0, 64, torch.full((2, 64, 16, 256), float(i)))
           for i in range(48)]  # 1 MiB each
    handed = threading.Event()

    def engine():
        for state in big:
            sender.on_layer(state)
        handed.set()

    thread = threading.Thread(target=engine)
    thread.start()
    # The receiver holds its first write. gRPC's flow-control windows take some states, the
    # sender's queue one more; then on_layer must wait for room instead of buffering all of
    # them, and the engine thread has not handed over every state.
    _wait_for(lambda: sender.backpressure_waits or handed.is_set())
    assert not handed.is_set() and len(sender.handed) < len(big)
    assert sender.backpressure_waits >= 1
    unblock.set()
    assert handed.wait(60)
    thread.join()
    sender.finish(FirstToken(3))
    assert [s.layer for s in target.states] == list(range(len(big)))
    assert all(torch.equal(s.tensor, b.tensor) for s, b in zip(target.states, big))


class TruncatingTransport(GrpcTransport):
    """Cuts the second chunk short: a message no protobuf reader can parse."""

    def tamper(self, chunk, message):
        return message[:40] if chunk.state.state_index == 1 else message


def test_malformed_message_is_data_loss(decode_side):
    receiver, address = decode_side
    target = RecordingTarget()
    receiver.expect("r10", "r10", 37, 0, target, _deadline())
    sender = TruncatingTransport(FINGERPRINT).open(address, "r10", "r10", 37, 0, _deadline(),
                                                   BINDING)
    with pytest.raises(TransferError) as err:
        for state in _states():
            sender.on_layer(state)
        sender.finish(FirstToken(1))
    assert err.value.reason is FailureReason.DATA_LOSS
    assert target.released.wait(60) and target.error.reason is FailureReason.DATA_LOSS


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="chunk_bytes=16"):
        GrpcTransport(FINGERPRINT, chunk_bytes=16)
    with pytest.raises(ValueError, match="decode_target='nowhere'"):
        GrpcTransport(FINGERPRINT).open("nowhere", "r", "r", 1, 0, _deadline(), BINDING)


class StoppedEngineTarget(RecordingTarget):
    """A receiver whose engine stopped between the last state and the commit."""

    def complete(self, first_token, cached_tokens=0):
        raise RuntimeError("the engine loop is stopped")


def test_receiver_failure_on_commit_releases_and_tells_the_sender(decode_side):
    receiver, address = decode_side
    target = StoppedEngineTarget()
    incoming = receiver.expect("r9", "r9", 37, 0, target, _deadline())
    sender = GrpcTransport(FINGERPRINT).open(address, "r9", "r9", 37, 0, _deadline(), BINDING)
    sender.on_layer(_states()[0])
    with pytest.raises(TransferError) as err:
        sender.finish(FirstToken(1))
    assert err.value.reason is FailureReason.UNAVAILABLE
    assert target.released.is_set() and incoming.state is TransferState.FAILED
    assert "could not commit" in incoming.error.message


def test_backpressure_never_outlives_the_deadline(decode_side):
    """An engine thread blocked on a full queue is let go when the transfer's deadline ends
    the call, even while the receiver is stuck."""
    receiver, address = decode_side
    unblock = threading.Event()
    target = RecordingTarget(block_writes=unblock)
    receiver.expect("r11", "r11", 64, 0, target, _deadline(30))
    transport = GrpcTransport(FINGERPRINT, chunk_bytes=1 << 20, max_queued_bytes=1 << 20)
    # The transfer's deadline is what this test is about: short, but far longer than it
    # takes the engine thread to fill the queue and block (asserted below).
    sender = transport.open(address, "r11", "r11", 64, 0, _deadline(3.0), BINDING)
    big = [LayerState(i, StateKind.KV, 0, 64, torch.full((2, 64, 16, 256), float(i)))
           for i in range(48)]
    outcome: list = []

    def engine():
        try:
            for state in big:
                sender.on_layer(state)
            outcome.append("returned")
        except TransferError as e:
            outcome.append(e.reason)

    thread = threading.Thread(target=engine)
    thread.start()
    thread.join(60)  # bounds a hang: the deadline lets the thread go after 3 s
    unblock.set()
    assert not thread.is_alive()
    assert outcome == [FailureReason.DEADLINE_EXCEEDED] and sender.backpressure_waits >= 1
    with pytest.raises(TransferError):
        sender.finish(FirstToken(1))


def test_a_sender_that_ends_its_stream_without_completing_cancels_the_transfer(decode_side,
                                                                               caplog):
    """A sender stops on its own (its prefill was aborted: the client left) by closing the
    stream without a completion: the transfer is cancelled, the reservation released, and the
    decode worker logs no warning for this ordinary end."""
    import logging

    from baton.workers.transfer import PROTOCOL_VERSION, wire

    receiver, address = decode_side
    target = RecordingTarget()
    receiver.expect("r-stop", "r-stop", 37, 0, target, _deadline())
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel, \
            caplog.at_level(logging.DEBUG):
        call = channel.stream_unary("/baton.decode.v1.DecodeService/TransferState")
        with pytest.raises(grpc.RpcError) as err:
            handshake = wire.encode_handshake(PROTOCOL_VERSION, FINGERPRINT, "r-stop", "r-stop",
                                              37, 0, BINDING)
            call(iter([handshake]), timeout=10)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    assert target.released.wait(60) and target.error.reason is FailureReason.CANCELLED
    # Closed before even the handshake: the same ordinary end.
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel, \
            caplog.at_level(logging.DEBUG):
        call = channel.stream_unary("/baton.decode.v1.DecodeService/TransferState")
        with pytest.raises(grpc.RpcError) as err:
            call(iter([]), timeout=10)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    assert "before its handshake" in err.value.details()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING
                and r.name.startswith("baton")]
