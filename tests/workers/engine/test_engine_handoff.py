"""State handed from a prefill engine to a decode engine through the sink."""

from __future__ import annotations

import pytest
import torch

from baton.workers.engine import (
    CacheFull,
    Engine,
    EngineConfig,
    LayerState,
    PrefillAborted,
    Request,
    SamplingParams,
    StateKind,
    StateTransferError,
)


def prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (n,), generator=g).tolist()


class ListSink:
    def __init__(self) -> None:
        self.states: list[LayerState] = []

    def on_layer(self, state: LayerState) -> None:
        self.states.append(state)


class ForwardingSink:
    """Writes each state into a reservation as it arrives (what the transfer layer does,
    after its handshake bound the reservation)."""

    def __init__(self, reservation) -> None:
        self.reservation = reservation
        reservation.bind(reservation.token, reservation.chain_hash)
        self.kinds: list[tuple[int, StateKind]] = []

    def on_layer(self, state: LayerState) -> None:
        self.kinds.append((state.layer, state.kind))
        self.reservation.write(state)


def drain(engine: Engine) -> dict[str, list]:
    events: dict[str, list] = {}
    while engine.has_work():
        for ev in engine.step():
            events.setdefault(ev.request_id, []).append(ev)
    return events


def engine_for(model, k: int = 0, **kw) -> Engine:
    return Engine(
        model,
        EngineConfig(
            **{
                "page_size": 4,
                "num_pages": 96,
                "max_num_seqs": 8,
                "max_batch_tokens": 12,
                "speculative_tokens": k,
                **kw,
            }
        ),
    )


def single_engine_tokens(model, request: Request, k: int = 0, others=()) -> list[int]:
    engine = engine_for(model, k)
    for r in (request, *others):
        engine.add_request(r)
    return [e.token_id for e in drain(engine)[request.request_id]]


def handoff(model, request: Request, k: int, recorder=None, busy=(), drafts=None):
    """Prefill on P, stream into a reservation on D (which has other work), decode on D.

    drafts: a DraftRecorder class; then every MTP draft D makes (from MTP state that came
    from P) is checked against the full-sequence MTP reference.
    """
    p, d = engine_for(model), engine_for(model, k)
    draft_recorder = drafts(d) if drafts is not None and k else None
    for r in busy:
        d.add_request(r)
    if recorder is not None:
        p.runner.logits_observer = recorder
        d.runner.logits_observer = recorder
    res = d.reserve(request)
    early = d.step()  # D keeps decoding its own requests while the state arrives
    sink = ForwardingSink(res)
    result = p.prefill(request, sink)
    assert p.stats().kv_cache_usage == 0 and p.stats().ssm_slot_usage == 0
    res.commit(result.first_token, request.sampling, result.logprob, result.top_logprobs)
    events = drain(d)
    for ev in reversed(early):
        events.setdefault(ev.request_id, []).insert(0, ev)
    assert d.stats().kv_cache_usage == 0 and d.stats().ssm_slot_usage == 0
    if draft_recorder is not None:
        tokens = {
            r.request_id: r.prompt_ids + [e.token_id for e in events[r.request_id]]
            for r in (request, *busy)
        }
        assert draft_recorder.check(model, tokens) > 0
        assert any(rid == request.request_id for rid, *_ in draft_recorder.drafts)
    return result, sink, events


@pytest.mark.parametrize("k", [0, 2])
def test_handoff_continues_like_one_engine(tiny_model, helpers, k):
    n = 23
    sampling = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=2)
    request = Request("h", prompt(1, n), sampling)
    recorder = helpers.Recorder()
    busy = [
        Request("busy", prompt(2, 9), SamplingParams(max_tokens=14, temperature=0, ignore_eos=True))
    ]
    result, sink, events = handoff(
        tiny_model, request, k, recorder, busy, drafts=helpers.DraftRecorder
    )
    tokens = [e.token_id for e in events["h"]]
    assert tokens[0] == result.first_token and len(tokens) == 10
    assert events["h"][0].logprob == result.logprob and len(result.top_logprobs) == 2
    assert events["h"][-1].finish_reason == "length"
    helpers.check(tiny_model, recorder, "h", request.prompt_ids + tokens, n)
    assert tokens == single_engine_tokens(tiny_model, Request("s", request.prompt_ids, sampling))

    # What the sink saw: KV per chunk of each attention layer, conv + ssm of each Mamba layer
    # once, the MTP layer's KV for positions 0..n-2, then the last hidden state.
    kinds = tiny_model.layer_kinds
    L = tiny_model.num_layers
    attn = [i for i in range(L) if kinds[i] == "attention"]
    mamba = [i for i in range(L) if kinds[i] == "mamba"]
    seen = sink.kinds
    chunks = -(-n // 12)
    assert sum(1 for _, kd in seen if kd == StateKind.KV) == chunks * len(attn)
    assert sorted(layer for layer, kd in seen if kd == StateKind.CONV) == mamba
    assert sorted(layer for layer, kd in seen if kd == StateKind.SSM) == mamba
    assert {layer for layer, kd in seen if kd == StateKind.MTP_KV} == {L}
    assert seen[-1] == (L, StateKind.HIDDEN)


def test_seeded_sampling_is_the_same_across_batches_and_handoff(tiny_model):
    sampling = SamplingParams(
        max_tokens=12, temperature=0.9, top_p=0.95, top_k=30, seed=1234, ignore_eos=True
    )
    ids = prompt(3, 17)
    alone = single_engine_tokens(tiny_model, Request("x", ids, sampling))
    others = [
        Request(
            f"o{i}",
            prompt(10 + i, 5 + 7 * i),
            SamplingParams(max_tokens=8, temperature=1.0, seed=i),
        )
        for i in range(4)
    ]
    crowded = single_engine_tokens(tiny_model, Request("x", ids, sampling), others=others)
    assert alone == crowded
    _, _, events = handoff(tiny_model, Request("x", ids, sampling), 0, busy=others[:2])
    assert [e.token_id for e in events["x"]] == alone
    other_seed = SamplingParams(**{**sampling.__dict__, "seed": 99})
    assert single_engine_tokens(tiny_model, Request("x", ids, other_seed)) != alone


def test_reserve_refuses_when_full_and_release_frees(tiny_model):
    d = engine_for(tiny_model, num_slots=2, max_model_len=60, num_pages=40)
    a = d.reserve(Request("a", prompt(1, 50)))
    b = d.reserve(Request("b", prompt(2, 10)))
    with pytest.raises(CacheFull):
        d.reserve(Request("c", prompt(3, 10)))
    assert d.stats().reserved == 2 and d.stats().ssm_slot_usage == 1.0
    with pytest.raises(ValueError, match="local_prefill_max_tokens"):
        d.reserve(Request("c", prompt(3, 10)), -1)
    a.release()
    a.release()  # idempotent
    with pytest.raises(StateTransferError, match="ended"):
        a.write(LayerState(1, StateKind.KV, 0, 1, torch.zeros(2, 1, 2, 8)))
    # Incomplete state is never decoded from.
    b.bind(b.token, b.chain_hash)
    with pytest.raises(StateTransferError, match="missing"):
        b.commit(5)
    with pytest.raises(StateTransferError, match="outside"):
        b.write(LayerState(1, StateKind.KV, 5, 11, torch.zeros(2, 6, 2, 8)))
    with pytest.raises(StateTransferError, match="layer 0"):
        b.write(LayerState(0, StateKind.KV, 0, 2, torch.zeros(2, 2, 2, 8)))
    with pytest.raises(StateTransferError, match="state after 7 tokens"):
        b.write(LayerState(0, StateKind.SSM, 0, 7, torch.zeros(4, 8, 8)))
    b.release()
    stats = d.stats()
    assert stats.reserved == 0 and stats.kv_cache_usage == 0 and stats.ssm_slot_usage == 0


def test_commit_after_release_and_abort_after_commit(tiny_model):
    p, d = engine_for(tiny_model), engine_for(tiny_model)
    request = Request(
        "r", prompt(4, 8), SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    )
    res = d.reserve(request)
    result = p.prefill(request, ForwardingSink(res))
    res.commit(result.first_token)
    d.step()
    res.release()  # after commit: aborts the running request
    events = drain(d)
    assert events["r"][-1].finish_reason == "abort"
    assert d.stats().kv_cache_usage == 0 and d.stats().ssm_slot_usage == 0


def test_failing_sink_fails_only_its_prefill(tiny_model):
    class Broken:
        def on_layer(self, state):
            raise ConnectionError("peer went away")

    p = engine_for(tiny_model)
    p.add_request(Request("bystander", prompt(5, 10), SamplingParams(max_tokens=3, temperature=0)))
    with pytest.raises(ConnectionError, match="peer"):
        p.prefill(Request("broken", prompt(6, 20)), Broken())
    events = drain(p)
    assert events["bystander"][-1].finished
    assert p.stats().kv_cache_usage == 0 and p.stats().ssm_slot_usage == 0


def test_prefills_share_one_step(tiny_model):
    p = engine_for(tiny_model, max_batch_tokens=64)
    results = []
    for i in range(3):
        p.add_prefill(Request(f"p{i}", prompt(70 + i, 10 + i)), ListSink(), results.append)
    calls = []
    forward = tiny_model.forward_batch
    try:
        tiny_model.forward_batch = lambda batch, *a, **kw: (
            calls.append(list(batch.seq_lens)) or forward(batch, *a, **kw)
        )
        p.step()
    finally:
        del tiny_model.forward_batch
    assert calls == [[10, 11, 12]]
    assert sorted(r.request_id for r in results) == ["p0", "p1", "p2"]
    assert all(r.num_prompt_tokens == 10 + i for i, r in enumerate(results))
    assert p.stats().kv_cache_usage == 0 and not p.has_work()


def test_handed_off_request_survives_preemption(tiny_model, helpers):
    # The decode engine is small: its own long request and the handed-off one fight for
    # pages; whichever is preempted is recomputed from its prompt and output so far.
    p = engine_for(tiny_model)
    d = engine_for(tiny_model, num_pages=30, max_model_len=100)
    recorder = helpers.Recorder()
    d.runner.logits_observer = recorder
    p.runner.logits_observer = recorder
    d.add_request(
        Request(
            "own", prompt(80, 30), SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        )
    )
    d.step()
    request = Request(
        "moved", prompt(81, 20), SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    )
    res = d.reserve(request)
    result = p.prefill(request, ForwardingSink(res))
    res.commit(result.first_token, request.sampling)
    events = drain(d)
    assert d.stats().preemptions_total > 0
    own = prompt(80, 30) + [e.token_id for e in events["own"]]
    moved = request.prompt_ids + [e.token_id for e in events["moved"]]
    assert len(own) == 70 and len(moved) == 60
    helpers.check(tiny_model, recorder, "own", own, 30)
    helpers.check(tiny_model, recorder, "moved", moved, 20)


def test_first_token_that_finishes_the_request(tiny_model):
    p, d = engine_for(tiny_model), engine_for(tiny_model)
    one = Request("one", prompt(7, 12), SamplingParams(max_tokens=1, temperature=0))
    res = d.reserve(one)
    result = p.prefill(one, ForwardingSink(res))
    assert result.finish_reason == "length"
    res.commit(result.first_token, one.sampling)
    events = drain(d)["one"]
    assert [(e.token_id, e.finish_reason) for e in events] == [(result.first_token, "length")]
    # A first token that is a stop token ends the request with "stop" on both sides. Both
    # engines now hold this prompt whole (snapshots at its end): P samples from its snapshot
    # without a forward, and D serves it alone (a local prefill of nothing).
    stop = Request(
        "stop",
        prompt(7, 12),
        SamplingParams(max_tokens=5, temperature=0, stop_token_ids=[result.first_token]),
    )
    again = p.prefill(stop, ListSink())
    assert again.finish_reason == "stop" and again.cached_tokens == 12
    res = d.reserve(stop)
    assert res.local_prefill and res.cached_tokens == 12
    assert [(e.token_id, e.finish_reason) for e in drain(d)["stop"]] == [
        (result.first_token, "stop")
    ]
    assert d.stats().kv_cache_usage == 0 and d.stats().ssm_slot_usage == 0


def test_abort_mid_prefill_fails_it_and_frees(tiny_model):
    p = engine_for(tiny_model, max_batch_tokens=8)
    outcome = []
    sink = ListSink()
    p.add_prefill(Request("long", prompt(8, 40)), sink, outcome.append)
    p.step()
    p.step()
    assert not outcome and p.stats().kv_cache_usage > 0
    assert sum(s.kind == StateKind.KV for s in sink.states) == 2 * 2  # 2 chunks, 2 layers
    assert p.abort("long")
    assert len(outcome) == 1 and isinstance(outcome[0], PrefillAborted)
    assert p.stats().kv_cache_usage == 0 and p.stats().ssm_slot_usage == 0
    assert not p.has_work() and p.step() == []
