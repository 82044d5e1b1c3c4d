"""Speculative decoding with the MTP layers: output equals decoding without it."""

from __future__ import annotations

import pytest
import torch

from baton.workers.engine import Engine, EngineConfig, Request, SamplingParams


def prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (n,), generator=g).tolist()


def run(model, requests, k: int, oracle=None, recorder=None):
    engine = Engine(
        model,
        EngineConfig(
            page_size=4, num_pages=128, max_num_seqs=8, max_batch_tokens=24, speculative_tokens=k
        ),
    )
    if recorder is not None:
        engine.runner.logits_observer = recorder
    if oracle is not None:
        draft = engine.runner.draft

        def oracle_draft(seqs):
            drafts = draft(seqs)  # keeps the MTP bookkeeping exactly as in production
            return [oracle(s, d) for s, d in zip(seqs, drafts)]

        engine.runner.draft = oracle_draft
    for r in requests:
        engine.add_request(Request(r.request_id, list(r.prompt_ids), r.sampling))
    out = {r.request_id: list(r.prompt_ids) for r in requests}
    while engine.has_work():
        for ev in engine.step():
            out[ev.request_id].append(ev.token_id)
    stats = engine.stats()
    assert stats.kv_cache_usage == 0 and stats.ssm_slot_usage == 0
    return out, stats


REQUESTS = [
    ("a", 7, 14),
    ("b", 19, 11),
    ("c", 2, 9),
    ("d", 30, 12),
]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_drafts_right_wrong_or_mixed_give_the_same_tokens(tiny_model, helpers, temperature):
    requests = [
        Request(
            rid,
            prompt(i, n),
            SamplingParams(max_tokens=m, temperature=temperature, seed=40 + i, ignore_eos=True),
        )
        for i, (rid, n, m) in enumerate(REQUESTS)
    ]
    reference, _ = run(tiny_model, requests, k=0)

    def oracle(seq, drafts):
        # a: always right, b: first right then wrong, c: always wrong, d: what the MTP said.
        truth = reference[seq.request_id][len(seq.tokens) : len(seq.tokens) + len(drafts)]
        truth += drafts[len(truth) :]
        if seq.request_id == "a":
            return truth
        if seq.request_id == "b":
            return truth[:1] + [(t + 1) % 97 for t in truth[1:]]
        if seq.request_id == "c":
            return [(t + 1) % 97 for t in truth]
        return drafts

    recorder = helpers.Recorder()
    spec, stats = run(tiny_model, requests, k=3, oracle=oracle, recorder=recorder)
    assert spec == reference
    assert stats.spec_accepted_tokens_total >= 10
    assert stats.spec_accepted_tokens_total < stats.spec_draft_tokens_total
    if temperature == 0:
        for rid, n, _ in REQUESTS:
            helpers.check(tiny_model, recorder, rid, spec[rid], n)
    # With the model's own MTP drafts too.
    plain, stats = run(tiny_model, requests, k=2)
    assert plain == reference and stats.spec_draft_tokens_total > 0


def test_all_drafts_accepted_takes_fewer_steps(tiny_model):
    request = Request(
        "x", prompt(5, 6), SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    )
    reference, _ = run(tiny_model, [request], k=0)

    def oracle(seq, drafts):
        return reference["x"][len(seq.tokens) : len(seq.tokens) + len(drafts)]

    engine_steps = []
    spec, stats = run(
        tiny_model,
        [request],
        k=3,
        oracle=oracle,
        recorder=lambda ids, pos, logits: engine_steps.append(len(pos)),
    )
    assert spec == reference
    # The first token comes from the prefill, then every verification emits 3 drafts + 1.
    assert engine_steps == [1, 4, 4, 4, 4]
    assert stats.spec_accepted_tokens_total == stats.spec_draft_tokens_total == 12


def test_rejection_mode_matches_recompute_and_is_batch_independent(tiny_model, helpers):
    requests = [
        Request(
            rid,
            prompt(i, n),
            SamplingParams(max_tokens=m, temperature=0.7, seed=7 + i, ignore_eos=True),
        )
        for i, (rid, n, m) in enumerate(REQUESTS)
    ]

    def run_rejection(reqs, recorder=None):
        engine = Engine(
            tiny_model,
            EngineConfig(
                page_size=4,
                num_pages=128,
                max_batch_tokens=24,
                speculative_tokens=2,
                spec_sampling="rejection",
            ),
        )
        if recorder is not None:
            engine.runner.logits_observer = recorder
        for r in reqs:
            engine.add_request(Request(r.request_id, list(r.prompt_ids), r.sampling))
        out = {r.request_id: list(r.prompt_ids) for r in reqs}
        while engine.has_work():
            for ev in engine.step():
                out[ev.request_id].append(ev.token_id)
        return out, engine.stats()

    recorder = helpers.Recorder()
    together, stats = run_rejection(requests, recorder)
    assert stats.spec_draft_tokens_total > 0
    for rid, n, _ in REQUESTS:
        helpers.check(tiny_model, recorder, rid, together[rid], n, greedy=False)
    alone, _ = run_rejection(requests[1:2])
    assert alone["b"] == together["b"]


def test_mtp_drafts_match_the_full_mtp_reference(tiny_model, helpers):
    """Draft logits equal the MTP depth run over whole sequences (no cache), through
    prefill, partial acceptance and chaining."""
    requests = [
        Request(rid, prompt(i, n), SamplingParams(max_tokens=m, temperature=0, ignore_eos=True))
        for i, (rid, n, m) in enumerate(REQUESTS[:3])
    ]
    engine = Engine(
        tiny_model,
        EngineConfig(page_size=4, num_pages=128, max_batch_tokens=24, speculative_tokens=3),
    )
    recorder = helpers.DraftRecorder(engine)
    for r in requests:
        engine.add_request(r)
    out = {r.request_id: list(r.prompt_ids) for r in requests}
    while engine.has_work():
        for ev in engine.step():
            out[ev.request_id].append(ev.token_id)
    assert {depth for _, _, depth, _ in recorder.drafts} == {0, 1, 2}
    assert recorder.check(tiny_model, out) >= 20
