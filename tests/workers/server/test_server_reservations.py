"""The decode servicer's reservations over a real engine loop: attach, release, expiry in every
state, the un-attached cap (a Reserve flood), and what a Generate call waits on.

Deadlines run on a heap with an injected clock (run_due() by hand): these tests are about
what happens when a deadline passes, not about how long anything takes.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import torch

from baton.proto.baton.decode.v1 import decode_pb2
from baton.proto.baton.worker.v1 import worker_pb2
from baton.workers.deadlines import Deadlines
from baton.workers.engine import (
    EndReason,
    Engine,
    EngineConfig,
    EngineLoop,
    LayerState,
    ReservationState,
)
from baton.workers.metrics import BatonMetrics, MetricLabels
from baton.workers.server.decode import DecodeServicer
from baton.workers.server.runtime import CallEnded, request_from_proto
from baton.workers.transfer import PROTOCOL_VERSION, FirstToken, ReservationBinding

TINY = Path(__file__).resolve().parents[3] / "examples" / "tiny"
FINGERPRINT = "f" * 64
ATTACH_S = 5.0


@pytest.fixture(scope="module")
def model():
    from baton.workers.model import load_model

    return load_model(TINY, dtype=torch.float32, device="cpu", kernels="torch")


class Clock:
    """time.time() plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class Runtime(SimpleNamespace):
    """What DecodeServicer needs of WorkerRuntime, with a real engine loop."""

    def __init__(self, loop: EngineLoop, max_concurrency: int):
        super().__init__(
            loop=loop, held=0,
            metrics=BatonMetrics(MetricLabels("test", "tiny", "decode")),
            config=SimpleNamespace(decode=SimpleNamespace(max_concurrency=max_concurrency),
                                   router=SimpleNamespace(transfer_timeout_seconds=60.0)))

    def count_held(self, delta: int) -> None:
        self.held += delta

    def deadline_of(self, message, context) -> float:
        return time.time() + 120.0

    def count_saved_transfer(self, *args) -> None:
        pass


@pytest.fixture
def decode(model):
    clock = Clock()
    slots = 4
    loop = EngineLoop(Engine(model, EngineConfig(page_size=16, num_pages=64, max_model_len=256,
                                                 max_num_seqs=slots)), idle_wait=0.01)
    runtime = Runtime(loop, slots)
    servicer = DecodeServicer(runtime, attach_timeout_s=ATTACH_S, reclaim_after_s=0.0,
                              deadlines=Deadlines(clock=clock, start_thread=False))
    servicer.receiver.fingerprint = FINGERPRINT
    yield SimpleNamespace(servicer=servicer, loop=loop, runtime=runtime, clock=clock,
                          model=model)
    loop.stop()


def _prompt(seed: int, n: int = 20) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (n,), generator=g).tolist()


def _reserve_request(rid: str, seed: int = 1, max_tokens: int = 4) -> decode_pb2.ReserveRequest:
    return decode_pb2.ReserveRequest(
        request_id=rid, prompt_token_ids=_prompt(seed),
        sampling=worker_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                           ignore_eos=True))


def _reserve(d, rid: str, seed: int = 1, max_tokens: int = 4):
    res, answer = d.servicer._reserve(_reserve_request(rid, seed, max_tokens))
    assert answer.reservation_token == res.token and answer.prompt_chain_hash == res.chain_hash
    return res, answer


class _Context:
    def __init__(self, registers: bool = True):
        self.registers = registers
        self.callbacks = []

    def add_callback(self, callback) -> bool:
        if self.registers:
            self.callbacks.append(callback)
        return self.registers

    def end(self) -> None:
        for callback in self.callbacks:
            callback()


def _wait(condition, what: str, timeout: float = 30.0) -> None:
    """Waits for a state the loop thread reaches (bounds a hang only)."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"{what}: not reached"
        time.sleep(0.01)  # a bounded poll for the asserted state


def _nothing_held(d) -> None:
    _wait(lambda: d.loop.stats().reserved == 0 and d.loop.stats().kv_cache_usage == 0
          and d.loop.stats().ssm_slot_usage == 0 and d.runtime.held == 0
          and len(d.servicer) == 0 and d.servicer.unattached() == 0,
          "every slot and page free, every reservation forgotten")


def _prefilled(d, res):
    """What a prefill worker would send for the reservation's request."""
    states: list[LayerState] = []

    class Sink:
        def on_layer(self, state):
            states.append(state)

    engine = Engine(d.model, EngineConfig(page_size=16, num_pages=32, max_num_seqs=2,
                                                 max_model_len=256))
    result = engine.prefill(res._seq.request, Sink())
    return states, FirstToken(result.first_token)


def _drive(d, res, state: ReservationState):
    """Moves a fresh reservation to `state` as a transfer and a Generate call would."""
    if state is ReservationState.OPEN:
        return
    incoming = d.servicer.receiver.incoming(res.reservation_id)
    incoming.accept_handshake(PROTOCOL_VERSION, FINGERPRINT, res.request_id, res.n_tokens,
                              res.cached_tokens, ReservationBinding(res.token, res.chain_hash))
    assert res.state is ReservationState.RECEIVING
    if state is ReservationState.RECEIVING:
        return
    states, first = _prefilled(d, res)
    for s in states:
        res.write(s)
    res.complete(first, 0)
    assert res.wait_started(0)
    # Committed; straight to STREAMING when a Generate call had attached already.
    assert res.state is (ReservationState.STREAMING if res.attached
                         else ReservationState.COMMITTED)
    if state is ReservationState.STREAMING:
        assert d.servicer._attach(res.reservation_id) is res
        assert res.state is ReservationState.STREAMING
    elif state is ReservationState.ENDED:
        d.servicer.end(res, EndReason.RELEASED, "test")
        assert res.wait_started(30)
        _wait(lambda: res.state is ReservationState.ENDED, "released")


@pytest.mark.parametrize("state", list(ReservationState))
def test_attach_expiry_in_every_state(decode, state):
    d = decode
    # Long enough that a committed request is still running when its attach deadline passes.
    res, _ = _reserve(d, "r", max_tokens=200)
    assert d.runtime.held == 1 and d.servicer.unattached() == 1
    _drive(d, res, state)
    d.clock.offset = ATTACH_S + 1  # past the attach deadline, not the transfer's
    d.servicer.deadlines.run_due()
    if state is ReservationState.STREAMING:
        # Attached: the attach deadline was cancelled; the request runs to its end.
        assert res.state is ReservationState.STREAMING and d.runtime.held == 1
        assert [e.finish_reason for e in res.stream][-1] == "length"
        d.servicer.end(res, EndReason.RELEASED, "the Generate call ended")
    else:
        _wait(lambda: res.state is ReservationState.ENDED, "expired")
        if state is not ReservationState.ENDED:
            assert res.ended is EndReason.ATTACH_EXPIRED
            assert d.servicer.receiver.in_flight() == 0  # its transfer was failed too
        with pytest.raises(CallEnded) as ended:  # a late Generate finds nothing
            list(d.servicer._generate(decode_pb2.GenerateRequest(
                reservation_id=res.reservation_id), _Context()))
        assert ended.value.code == grpc.StatusCode.NOT_FOUND
    _nothing_held(d)


def test_a_generate_call_that_ended_before_its_handler_ran_frees_its_reservation_at_once(
        decode):
    """Under load the router may give up on a Generate before the worker's handler runs; the
    handler then cannot register its done-callback (add_callback is False). The reservation
    must be released at once, not held until its attach deadline."""
    d = decode
    res, answer = _reserve(d, "r1")
    assert not answer.local_prefill and answer.reservation_id
    assert d.servicer.receiver.in_flight() == 1
    with pytest.raises(CallEnded) as ended:
        list(d.servicer._generate(decode_pb2.GenerateRequest(
            request_id="r1", reservation_id=answer.reservation_id), _Context(False)))
    assert ended.value.outcome == "cancelled"
    assert d.servicer.receiver.in_flight() == 0
    _nothing_held(d)


def _generate_in_thread(d, res, context: _Context):
    """A Generate call's handler on a thread, attached: (thread, its messages, its failure)."""
    out: list = []
    failure: list[CallEnded] = []

    def generate() -> None:
        try:
            out.extend(d.servicer._generate(decode_pb2.GenerateRequest(
                reservation_id=res.reservation_id), context))
        except CallEnded as e:
            failure.append(e)

    gen = threading.Thread(target=generate)
    gen.start()
    _wait(lambda: res.attached, "the Generate call attached")
    return gen, out, failure


def test_generate_waits_on_the_reservation_and_streams_once_the_state_arrived(decode):
    d = decode
    res, _ = _reserve(d, "r2")
    context = _Context()
    gen, out, _ = _generate_in_thread(d, res, context)
    assert res.state is ReservationState.OPEN and not out  # waiting, nothing streamed
    _drive(d, res, ReservationState.COMMITTED)
    gen.join(60)
    assert not gen.is_alive()
    assert res.state is ReservationState.ENDED and res.ended is EndReason.FINISHED
    assert [len(m.tokens) for m in out] == [1, 1, 1, 1]
    assert out[-1].finish_reason == decode_pb2.FINISH_REASON_LENGTH
    context.end()  # gRPC runs the done-callback: a no-op on an ended reservation
    _nothing_held(d)


def test_a_generate_waiting_for_its_state_ends_when_its_call_ends(decode):
    d = decode
    res, _ = _reserve(d, "r3")
    context = _Context()
    gen, _, failure = _generate_in_thread(d, res, context)
    context.end()  # the router cancelled: the wait wakes (no poll)
    gen.join(60)
    assert not gen.is_alive() and failure[0].code == grpc.StatusCode.CANCELLED
    _nothing_held(d)


def test_generate_needs_a_held_reservation_and_release_frees_one(decode):
    d = decode
    for rid, code in (("", grpc.StatusCode.INVALID_ARGUMENT),
                      ("nobody", grpc.StatusCode.NOT_FOUND)):
        with pytest.raises(CallEnded) as ended:
            list(d.servicer._generate(decode_pb2.GenerateRequest(reservation_id=rid),
                                      _Context()))
        assert ended.value.code == code and ended.value.outcome == "rejected"
    res, answer = _reserve(d, "r4")
    release = decode_pb2.ReleaseRequest(reservation_id=answer.reservation_id)
    assert d.servicer.Release(release, _Context()).released
    _wait(lambda: res.state is ReservationState.ENDED, "released")
    assert not d.servicer.Release(release, _Context()).released  # idempotent
    with pytest.raises(CallEnded) as ended:  # released: nothing to stream any more
        list(d.servicer._generate(decode_pb2.GenerateRequest(
            reservation_id=answer.reservation_id), _Context()))
    assert ended.value.code == grpc.StatusCode.NOT_FOUND
    _nothing_held(d)


def test_unattached_reservations_are_capped_and_the_oldest_is_reclaimed(decode):
    """With --max-open-reservations 2, a third Reserve takes back the oldest un-attached
    reservation: reservations nobody attaches to cannot pile up."""
    d = decode
    assert d.servicer.max_open == 4  # the default: every slot
    d.servicer.max_open = 2
    first, _ = _reserve(d, "f1", 1)
    second, _ = _reserve(d, "f2", 2)
    third, _ = _reserve(d, "f3", 3)
    assert first.state is ReservationState.ENDED and first.ended is EndReason.RECLAIMED
    assert d.servicer.unattached() == 2 and d.runtime.held == 2
    with pytest.raises(CallEnded) as ended:  # its Generate comes too late
        list(d.servicer._generate(decode_pb2.GenerateRequest(
            reservation_id=first.reservation_id), _Context()))
    assert ended.value.code == grpc.StatusCode.NOT_FOUND
    # An attached reservation is not counted: two more may wait beside it.
    assert d.servicer._attach(second.reservation_id) is second
    fourth, _ = _reserve(d, "f4", 4)
    assert second.state is ReservationState.OPEN and third.state is ReservationState.OPEN
    assert d.servicer.unattached() == 2 and d.runtime.held == 3
    # Reservations younger than reclaim_after_s are real requests on their way: a Reserve
    # past the cap is refused as full instead (the router queues it and tries again).
    d.servicer.reclaim_after_s = 3600.0
    with pytest.raises(CallEnded) as ended:
        _reserve(d, "f5", 5)
    assert ended.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    for res in (second, third, fourth):
        d.servicer.end(res, EndReason.RELEASED, "test")
    _nothing_held(d)


def test_a_full_engine_takes_back_the_oldest_unattached_reservation(decode):
    """Every slot reserved, one attached: a new Reserve reclaims the oldest un-attached one
    (never the attached one) instead of waiting for its attach deadline."""
    d = decode
    held = [_reserve(d, f"u{i}", 10 + i)[0] for i in range(4)]
    assert d.servicer._attach(held[0].reservation_id) is held[0]
    fresh, _ = _reserve(d, "fresh", 20)
    assert held[1].state is ReservationState.ENDED and held[1].ended is EndReason.RECLAIMED
    assert held[0].state is ReservationState.OPEN and fresh.state is ReservationState.OPEN
    d.servicer.reclaim_after_s = 3600.0  # all young now: full is full
    with pytest.raises(CallEnded) as ended:
        _reserve(d, "late", 21)
    assert ended.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    for res in (held[0], held[2], held[3], fresh):
        d.servicer.end(res, EndReason.RELEASED, "test")
    _nothing_held(d)


def test_request_conversion_keeps_the_prompt_the_chain_hash_names(decode):
    res, answer = _reserve(decode, "r5", 9)
    from baton.workers.engine import prompt_chain_hash

    req = request_from_proto(_reserve_request("r5", 9))
    assert answer.prompt_chain_hash == prompt_chain_hash(req.prompt_ids)
    decode.servicer.end(res, EndReason.RELEASED, "test")
    _nothing_held(decode)


def test_reservations_start_no_thread_of_their_own(decode):
    """Attach and transfer deadlines are entries on the servicer's one heap."""
    d = decode
    before = threading.active_count()
    held = [_reserve(d, f"t{i}", 30 + i)[0] for i in range(4)]
    assert threading.active_count() == before
    assert len(d.servicer.deadlines) == 8  # an attach and a transfer deadline each
    for res in held:
        d.servicer.end(res, EndReason.RELEASED, "test")
    _nothing_held(d)
