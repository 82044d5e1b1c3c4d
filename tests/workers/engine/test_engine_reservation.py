"""DecodeReservation: every transition of the state machine, the illegal ones refused, and
release from every state leaving no slot or page behind."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from baton.workers.engine import (
    BindingRefused,
    EndReason,
    Engine,
    EngineConfig,
    LayerState,
    Request,
    ReservationState,
    SamplingParams,
    StateTransferError,
    prompt_chain_hash,
)

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_handoff import drain, prompt

OPEN, RECEIVING, COMMITTED, STREAMING, ENDED = (
    ReservationState.OPEN, ReservationState.RECEIVING, ReservationState.COMMITTED,
    ReservationState.STREAMING, ReservationState.ENDED)


def engine_for(model) -> Engine:
    return Engine(model, EngineConfig(page_size=4, num_pages=96, max_num_seqs=8,
                                      max_batch_tokens=12))


class Sink:
    def __init__(self) -> None:
        self.states: list[LayerState] = []

    def on_layer(self, state: LayerState) -> None:
        self.states.append(state)


def request(name: str = "r", seed: int = 1, n: int = 9) -> Request:
    return Request(name, prompt(seed, n), SamplingParams(max_tokens=6, temperature=0,
                                                         ignore_eos=True))


def prefilled(model, req: Request):
    """The states and first token a prefill worker sends for req."""
    sink = Sink()
    result = engine_for(model).prefill(req, sink)
    return sink.states, result.first_token


def assert_nothing_held(engine: Engine) -> None:
    drain(engine)
    st = engine.stats()
    assert st.reserved == 0 and st.kv_cache_usage == 0 and st.ssm_slot_usage == 0
    assert engine.reservations == {}


def to_state(engine: Engine, model, state: ReservationState, req: Request):
    """A reservation driven to `state` through its legal transitions."""
    res = engine.reserve(req)
    assert res.state is OPEN
    if state is OPEN:
        return res
    states, first = prefilled(model, req)
    res.bind(res.token, res.chain_hash)
    assert res.state is RECEIVING
    if state is RECEIVING:
        res.write(states[0])
        return res
    for s in states:
        res.write(s)
    res.commit(first, req.sampling)
    assert res.state is COMMITTED
    if state is COMMITTED:
        return res
    assert res.attach()
    assert res.state is STREAMING
    if state is STREAMING:
        return res
    res.release()
    return res


def test_chain_hash_names_the_prompt_exactly():
    a = prompt_chain_hash([5, 6, 7])
    assert len(a) == 32 and a == prompt_chain_hash((5, 6, 7))
    assert a != prompt_chain_hash([5, 6, 8]) and a != prompt_chain_hash([5, 6, 7, 0])
    assert prompt_chain_hash([]) != prompt_chain_hash([0])
    # Token ids are 32-bit: 256 is not (1, 0) or (0, 1).
    assert prompt_chain_hash([256]) != prompt_chain_hash([1, 0])


def test_the_whole_life_decodes_what_was_prefilled(tiny_model):
    d = engine_for(tiny_model)
    req = request()
    res = to_state(d, tiny_model, STREAMING, req)
    events = drain(d)["r"]
    assert len(events) == 6 and events[-1].finish_reason == "length"
    res.end(EndReason.FINISHED)
    assert res.state is ENDED and res.ended is EndReason.FINISHED
    res.release()  # ended: nothing more to free, and the finished request is left alone
    assert_nothing_held(d)


def test_an_early_attach_makes_commit_go_straight_to_streaming(tiny_model):
    d = engine_for(tiny_model)
    req = request()
    res = d.reserve(req)
    assert res.attach() and res.state is OPEN and not res.attach()  # one stream only
    states, first = prefilled(tiny_model, req)
    res.bind(res.token, res.chain_hash)
    for s in states:
        res.write(s)
    res.commit(first, req.sampling)
    assert res.state is STREAMING
    drain(d)
    res.release()
    assert_nothing_held(d)


def test_tokens_are_unguessable_and_bound_to_one_reservation(tiny_model):
    d = engine_for(tiny_model)
    a, b = d.reserve(request("a")), d.reserve(request("b", seed=2))
    assert len(a.token) == 32 and a.token != b.token
    assert a.chain_hash == prompt_chain_hash(a._seq.request.prompt_ids)
    with pytest.raises(BindingRefused, match="token"):
        a.bind(b.token, a.chain_hash)
    with pytest.raises(BindingRefused, match="token"):
        a.bind("", a.chain_hash)
    with pytest.raises(BindingRefused, match="another prompt"):
        a.bind(a.token, b.chain_hash)
    assert a.state is OPEN  # a refused binding changes nothing
    a.release()
    b.release()
    assert_nothing_held(d)


@pytest.mark.parametrize("state", [OPEN, RECEIVING, COMMITTED, STREAMING, ENDED])
def test_illegal_transitions_are_refused_in_every_state(tiny_model, state):
    d = engine_for(tiny_model)
    req = request()
    states, first = prefilled(tiny_model, req)
    res = to_state(d, tiny_model, state, req)
    if state is not OPEN:
        with pytest.raises(BindingRefused, match="takes no transfer"):
            res.bind(res.token, res.chain_hash)  # one transfer per reservation
    if state is not RECEIVING:
        with pytest.raises(StateTransferError, match="takes writes only from the transfer"):
            res.write(states[-1])
        with pytest.raises(StateTransferError, match="only a bound transfer commits"):
            res.commit(first, req.sampling)
    else:
        with pytest.raises(StateTransferError, match="incomplete"):
            res.commit(first, req.sampling)  # a lost chunk is never decoded from
    if state in (STREAMING, ENDED):
        assert not res.attach()
    assert res.state is state
    res.release()
    assert_nothing_held(d)


@pytest.mark.parametrize("state", [OPEN, RECEIVING, COMMITTED, STREAMING, ENDED])
def test_release_in_every_state_frees_every_slot_and_page(tiny_model, state):
    d = engine_for(tiny_model)
    others = [request("busy", seed=7, n=11)]
    d.add_request(others[0])
    req = request()
    res = to_state(d, tiny_model, state, req)
    res.release(EndReason.RELEASED, "test")
    res.release()  # idempotent
    assert res.state is ENDED and res.wait_started(0)
    events = drain(d)
    if state in (COMMITTED, STREAMING):
        assert events["r"][-1].finish_reason == "abort"
    assert events["busy"][-1].finish_reason == "length"  # the neighbour is untouched
    assert_nothing_held(d)
