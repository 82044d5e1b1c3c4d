"""Snapshot points (the router's chat message boundaries): prefill chunks end there and the
prefix cache snapshots there, so a next turn that re-renders everything after a boundary hits
at it. A hit at a point equals the cache-off run (teacher-forced fp32 logits within 1e-4,
greedy tokens equal), on one engine, on the prefill side of a handoff and in a decode
worker's local prefill, with MTP speculation on."""

from __future__ import annotations

import pytest
import torch

from baton.workers.engine import Engine, EngineConfig, Request, SamplingParams

PAGE = 4


def prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (n,), generator=g).tolist()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def engine_for(model, k: int = 0, prefix: bool = True) -> Engine:
    # No interval snapshots: the points alone make the hits.
    return Engine(model, EngineConfig(page_size=PAGE, num_pages=200, max_num_seqs=8,
                                      max_batch_tokens=64, speculative_tokens=k,
                                      prefix_cache=prefix, snapshot_interval=0))


def drain(engine: Engine) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while engine.has_work():
        for ev in engine.step():
            if ev.token_id is not None:
                out.setdefault(ev.request_id, []).append(ev.token_id)
    return out


def serve(engine: Engine, request: Request) -> list[int]:
    engine.add_request(request)
    return drain(engine)[request.request_id]


class Forward:
    def __init__(self, reservation) -> None:
        self.reservation = reservation

    def on_layer(self, state) -> None:
        self.reservation.write(state)


# Turn 1: [system+user: 13][generation prompt: 3]; turn 2 re-renders the generation prompt
# and the answer (`<think>\n` -> `<think></think>`) and adds a tool result.
HISTORY = prompt(1, 13)
TURN1 = Request("t1", HISTORY + prompt(2, 3), greedy(4), snapshot_points=(13,))
TURN2 = Request("t2", HISTORY + prompt(3, 9), greedy(4), snapshot_points=(13, 20))


@pytest.mark.parametrize("k", [0, 2])
def test_a_hit_at_a_snapshot_point_equals_the_cache_off_run(tiny_model, helpers, k):
    engine = engine_for(tiny_model, k)
    recorder = helpers.Recorder()
    engine.runner.logits_observer = recorder
    chunks = []
    forward = tiny_model.forward_batch
    try:
        tiny_model.forward_batch = lambda batch, *a, **kw: (
            chunks.append(list(batch.seq_lens)) or forward(batch, *a, **kw))
        out1 = serve(engine, TURN1)
    finally:
        del tiny_model.forward_batch
    assert chunks[:2] == [[13], [3]]  # the prompt's chunk ended at the point
    before = engine.stats().prefix_hit_tokens_total
    out2 = serve(engine, TURN2)
    assert engine.stats().prefix_hit_tokens_total - before == 13
    for r, out in ((TURN1, out1), (TURN2, out2)):
        helpers.check(tiny_model, recorder, r.request_id, r.prompt_ids + out,
                      len(r.prompt_ids))
    cold = engine_for(tiny_model, k, prefix=False)
    assert [serve(cold, TURN1), serve(cold, TURN2)] == [out1, out2]
    # Without the point, turn 2 would have found nothing.
    plain = engine_for(tiny_model, k)
    serve(plain, Request("p1", TURN1.prompt_ids, greedy(4)))
    before = plain.stats().prefix_hit_tokens_total
    serve(plain, Request("p2", TURN2.prompt_ids, greedy(4)))
    assert plain.stats().prefix_hit_tokens_total == before


@pytest.mark.parametrize("k", [0, 2])
def test_points_on_the_prefill_side_and_in_a_local_prefill(tiny_model, helpers, k):
    cold = engine_for(tiny_model, k, prefix=False)
    expected = [serve(cold, TURN1), serve(cold, TURN2)]
    # Prefill side: P snapshots at the point while it prefills turn 1 for D.
    p, d = engine_for(tiny_model), engine_for(tiny_model, k)
    recorder = helpers.Recorder()
    p.runner.logits_observer = recorder
    d.runner.logits_observer = recorder

    def handoff(request: Request) -> tuple[list[int], int]:
        res = d.reserve(request, 0)
        result = p.prefill(request, Forward(res), sink_from=res.cached_tokens)
        res.commit(result.first_token, request.sampling, result.logprob, result.top_logprobs)
        return drain(d)[request.request_id], result.cached_tokens

    got, cached = zip(*(handoff(r) for r in (TURN1, TURN2)))
    assert list(got) == expected and cached == (0, 13)
    helpers.check(tiny_model, recorder, "t2", TURN2.prompt_ids + got[1], len(TURN2.prompt_ids))
    # Decode side: D holds a shorter prefix (a first turn it decoded), so it prefills turns 1
    # and 2 itself, and snapshots at the point in turn 1's local prefill.
    p, d = engine_for(tiny_model), engine_for(tiny_model, k)
    d.runner.logits_observer = recorder = helpers.Recorder()
    handoff(Request("t0", HISTORY[:8], greedy(2)))
    got, cached = [], []
    for request in (TURN1, TURN2):
        res = d.reserve(request, 64)
        assert res.local_prefill
        cached.append(res.cached_tokens)
        got.append(drain(d)[request.request_id])
    assert got == expected and cached == [8, 13]
    helpers.check(tiny_model, recorder, "t2", TURN2.prompt_ids + got[1], len(TURN2.prompt_ids))
