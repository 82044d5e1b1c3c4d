"""presence/frequency/repetition penalties, logit_bias and min_tokens: the math against a
per-token reference, the engine's tokens against that reference recomputed from scratch at
every position, and seeded tokens that do not depend on where they are sampled."""

from __future__ import annotations

import gc

import pytest
import torch

from baton.workers.engine import Engine, EngineConfig, Request, SamplingParams
from baton.workers.engine.penalties import PenaltyTable, apply_penalties
from baton.workers.engine.sampling import SampleRow, filter_logits, gumbel_noise, row_key

EOS = 2


def prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (n,), generator=g).tolist()


def engine_for(model, k: int = 0, **kw) -> Engine:
    return Engine(model, EngineConfig(**{"page_size": 4, "num_pages": 160, "max_num_seqs": 8,
                                         "max_batch_tokens": 16, "speculative_tokens": k,
                                         "base_seed": 0, **kw}))


def drain(engine: Engine) -> dict[str, list]:
    events: dict[str, list] = {}
    while engine.has_work():
        for ev in engine.step():
            events.setdefault(ev.request_id, []).append(ev)
    return events


def run(model, requests, k: int = 0, recorder=None, stats=None, **kw) -> dict[str, list[int]]:
    engine = engine_for(model, k, **kw)
    if recorder is not None:
        engine.runner.logits_observer = recorder
    for r in requests:
        engine.add_request(r)
    events = drain(engine)
    assert engine.stats().kv_cache_usage == 0
    if stats is not None:
        stats.append(engine.stats())
    return {rid: [e.token_id for e in evs if e.token_id is not None]
            for rid, evs in events.items()}


def reference_logits(raw: torch.Tensor, before: list[int], output_start: int,
                     sp: SamplingParams, stop_ids: list[int]) -> torch.Tensor:
    """One row processed from scratch, token by token (no table, no batching)."""
    x = raw.float().clone()
    for token, bias in sp.logit_bias.items():
        x[token] += bias
    output = before[output_start:]
    for token in set(before):
        if x[token] > 0:
            x[token] = x[token] / sp.repetition_penalty
        else:
            x[token] = x[token] * sp.repetition_penalty
    for token in set(output):
        n = output.count(token)
        x[token] -= sp.frequency_penalty * n + sp.presence_penalty
    if len(output) < sp.min_tokens:
        held = x.clone()
        held[stop_ids] = float("-inf")
        if torch.isfinite(held).any():
            x = held
    return x


class ForwardingSink:
    """Writes each prefill state into a reservation (what the transfer layer does)."""

    def __init__(self, reservation) -> None:
        self.reservation = reservation

    def on_layer(self, state) -> None:
        self.reservation.write(state)


def test_apply_penalties_matches_the_per_token_reference():
    torch.manual_seed(0)
    n, vocab = 5, 40
    logits = torch.randn(n, vocab) * 3
    counts = torch.randint(0, 4, (n, vocab), dtype=torch.int32) * (torch.rand(n, vocab) < 0.3)
    appeared = (torch.rand(n, vocab) < 0.2) | (counts > 0)
    presence = torch.tensor([0.0, 0.5, -1.0, 2.0, 1.5])
    frequency = torch.tensor([0.0, 1.0, 0.25, -2.0, 0.5])
    repetition = torch.tensor([1.0, 1.3, 0.7, 2.0, 1.1])
    rows, tokens = appeared.nonzero(as_tuple=True)
    entry_counts = counts[rows, tokens]

    def penalized(*params):
        return apply_penalties(logits.clone(), rows, tokens, entry_counts, *params)

    got = penalized(presence, frequency, repetition)
    for i in range(n):
        for v in range(vocab):
            x = float(logits[i, v])
            c = int(counts[i, v])
            if bool(appeared[i, v]):
                x = x / float(repetition[i]) if x > 0 else x * float(repetition[i])
            x -= float(frequency[i]) * c + (float(presence[i]) if c > 0 else 0.0)
            assert abs(float(got[i, v]) - x) <= 1e-5 * max(1.0, abs(x)), (i, v)
    # A penalty off for every row (None) leaves its term out.
    assert torch.equal(penalized(None, None, repetition),
                       penalized(torch.zeros(n), torch.zeros(n), repetition))


def test_penalty_table_keeps_counts_incrementally():
    class Owner:
        pass

    table = PenaltyTable(10, "cpu", rows=2)
    a, b, c = Owner(), Owner(), Owner()
    ra = table.add(a, [1, 1, 2], [3, 3])
    rb = table.add(b, [5], [])
    rc = table.add(c, [2], [4])  # a third row: the table grows
    assert table.num_rows == 4 and len({ra.row, rb.row, rc.row}) == 3
    table.count([ra, rb], [[3, 4], [5, 5, 5]])
    for step in range(12):  # more chunks than are kept apart: they are concatenated
        table.count([rc], [[4 if step % 2 else 9 - step % 3]])
    rows, tokens, counts = table.entries([ra, rb, rc, ra], [[], [6], [4, 4], [9, 3, 9]])
    got = sorted(zip(rows.tolist(), tokens.tolist(), counts.tolist()))
    # Row 0: prompt 1, 2 (count 0), output 3, 3, 3, 4; row 1: prompt 5 = output 5, 5, 5, and
    # a draft 6; row 2: prompt 2, output 4 + 6 x 4, 9 x 2, 8 x 2, 7 x 2, two drafts 4; row 3
    # (row a again): drafts 9, 3, 9 on top.
    assert got == [(0, 1, 0), (0, 2, 0), (0, 3, 3), (0, 4, 1), (1, 5, 3), (1, 6, 1),
                   (2, 2, 0), (2, 4, 9), (2, 7, 2), (2, 8, 2), (2, 9, 2),
                   (3, 1, 0), (3, 2, 0), (3, 3, 4), (3, 4, 1), (3, 9, 2)]
    assert len(rc.chunks) <= 8
    # The extras (drafts) are not written down.
    assert table.output_counts[ra.row].tolist() == torch.bincount(
        torch.tensor([3, 3, 3, 4]), minlength=10).tolist()
    assert 6 not in rb.index and 9 not in ra.index
    # A row goes back to the table with its owner and is cleared for the next one.
    row_a = ra.row
    del a, ra
    gc.collect()
    rd = table.add(Owner(), [7], [])
    assert rd.row == row_a and table.output_counts[rd.row].sum() == 0
    rows, tokens, counts = table.entries([rd], [[]])
    assert (tokens.tolist(), counts.tolist()) == ([7], [0])


PENALTIES = {
    "presence": dict(presence_penalty=2.0),
    "frequency": dict(frequency_penalty=1.5),
    "repetition": dict(repetition_penalty=2.0),
    "logit_bias": dict(logit_bias={5: 8.0, 11: 6.0, 40: -100.0}),
    "all": dict(presence_penalty=-0.5, frequency_penalty=0.75, repetition_penalty=1.5,
                logit_bias={5: 3.0}),
}


@pytest.mark.parametrize("name", list(PENALTIES))
@pytest.mark.parametrize("k", [0, 2])
def test_tokens_follow_the_reference_at_every_position(tiny_model, helpers, name, k):
    """Greedy and seeded requests with each parameter: every emitted token is what the
    reference processing of that position's raw logits (from the tokens before it) gives;
    and the parameter changed the output."""
    p = prompt(1, 9)
    params = {
        "greedy": SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                 **PENALTIES[name]),
        "seeded": SamplingParams(max_tokens=24, temperature=0.8, seed=3, ignore_eos=True,
                                 **PENALTIES[name]),
    }
    recorder = helpers.Recorder()
    stats = []
    got = run(tiny_model, [Request(rid, p, sp) for rid, sp in params.items()], k, recorder,
              stats)
    if k:  # rows after accepted drafts (which count them as output) are among those checked
        assert stats[0].spec_accepted_tokens_total > 0
    plain = run(tiny_model, [Request(rid, p, SamplingParams(
        max_tokens=24, temperature=sp.temperature, seed=sp.seed, ignore_eos=True))
        for rid, sp in params.items()], k)
    for rid, sp in params.items():
        tokens = p + got[rid]
        assert len(got[rid]) == 24
        assert got[rid] != plain[rid], f"{name} did not change {rid}"
        checked = 0
        for pos in range(len(p), len(tokens)):
            x = reference_logits(recorder.logits[(rid, pos)], tokens[:pos], len(p), sp, [])
            if not sp.greedy:
                row = SampleRow(sp, sp.seed, pos)
                x = filter_logits(x[None], [row])[0] + gumbel_noise(
                    [row_key(sp.seed, pos)], x.shape[0], "cpu")[0]
            top2 = torch.topk(x, 2).values
            if float(top2[0] - top2[1]) > 1e-3:
                checked += 1
                assert tokens[pos] == int(x.argmax()), f"{name} {rid} position {pos}"
        assert checked >= 20


def test_min_tokens_holds_back_eos_and_stop_ids(tiny_model):
    """A bias makes eos (and a stop token) the certain choice: min_tokens holds it back for
    exactly min_tokens tokens, counting an earlier attempt's output."""
    p = prompt(2, 6)
    fresh = run(tiny_model, [
        Request("eos", p, SamplingParams(max_tokens=20, temperature=0.0, min_tokens=5,
                                         logit_bias={EOS: 100.0})),
        Request("stop", p, SamplingParams(max_tokens=20, temperature=0.7, seed=1, min_tokens=3,
                                          stop_token_ids=[17], logit_bias={17: 100.0})),
        Request("none", p, SamplingParams(max_tokens=20, temperature=0.0,
                                          logit_bias={EOS: 100.0})),
    ])
    assert len(fresh["eos"]) == 6 and fresh["eos"][-1] == EOS and EOS not in fresh["eos"][:5]
    assert len(fresh["stop"]) == 4 and fresh["stop"][-1] == 17
    assert fresh["none"] == [EOS]
    # A retry whose prompt ends with 3 output tokens of the earlier attempt: 2 more to go.
    retry = run(tiny_model, [Request("retry", p + fresh["eos"][:3], SamplingParams(
        max_tokens=17, temperature=0.0, min_tokens=5, logit_bias={EOS: 100.0}),
        num_output_tokens=3)])
    assert retry["retry"] == fresh["eos"][3:]


def seeded(rid: str, seed: int, n: int = 20) -> Request:
    return Request(rid, prompt(10 + seed, 7 + seed), SamplingParams(
        max_tokens=n, temperature=1.0, seed=seed, ignore_eos=True, presence_penalty=0.8,
        frequency_penalty=0.6, repetition_penalty=1.4, logit_bias={seed + 20: 4.0},
        min_tokens=4))


def test_seeded_tokens_do_not_depend_on_where_they_are_sampled(tiny_model):
    """Alone, in a batch with other requests, with speculation (coupled), and prefilled on
    one engine then decoded on another: the same tokens."""
    alone = {f"s{i}": run(tiny_model, [seeded(f"s{i}", i)])[f"s{i}"] for i in range(3)}
    others = [Request(f"o{i}", prompt(50 + i, 5), SamplingParams(
        max_tokens=12, temperature=0.9, seed=i, frequency_penalty=-1.0)) for i in range(3)]
    batched = run(tiny_model, [*others, *(seeded(f"s{i}", i) for i in range(3))])
    speculative = run(tiny_model, [seeded(f"s{i}", i) for i in range(3)], k=2)
    for rid, tokens in alone.items():
        assert batched[rid] == tokens, rid
        assert speculative[rid] == tokens, rid
    # Prefill on P (first token there), decode on D with speculation.
    for i in range(3):
        request = seeded(f"s{i}", i)
        p, d = engine_for(tiny_model), engine_for(tiny_model, 2)
        res = d.reserve(request, len(request.prompt_ids))
        res.bind(res.token, res.chain_hash)
        result = p.prefill(request, ForwardingSink(res))
        res.commit(result.first_token, request.sampling)
        events = drain(d)[request.request_id]
        assert [e.token_id for e in events] == alone[request.request_id]


def test_a_retry_with_num_output_tokens_continues_the_request(tiny_model):
    """The router's retry: prompt + the tokens already streamed, num_output_tokens of them,
    the remaining budget: the penalties count the earlier output, so the rest is the same."""
    request = seeded("r", 4, n=18)
    full = run(tiny_model, [request])["r"]
    for m in (1, 7):
        retry = Request("r2", request.prompt_ids + full[:m], SamplingParams(
            **{**request.sampling.__dict__, "max_tokens": 18 - m}), num_output_tokens=m)
        for k in (0, 2):
            assert run(tiny_model, [retry], k)["r2"] == full[m:], (m, k)
    # Without num_output_tokens the earlier output is prompt: the penalties see less.
    plain = Request("r3", request.prompt_ids + full[:7], SamplingParams(
        **{**request.sampling.__dict__, "max_tokens": 11}))
    assert run(tiny_model, [plain])["r3"] != full[7:]


def test_bad_values_are_refused_naming_the_field(tiny_model):
    engine = engine_for(tiny_model)
    with pytest.raises(ValueError, match="logit_bias.*token 97 is outside the vocabulary"):
        engine.add_request(Request("b", [5, 6], SamplingParams(logit_bias={97: 1.0})))
    with pytest.raises(ValueError, match="num_output_tokens=2"):
        engine.add_request(Request("n", [5, 6], SamplingParams(), num_output_tokens=2))
    with pytest.raises(ValueError, match="presence_penalty"):
        engine.add_request(Request("p", [5], SamplingParams(presence_penalty=float("nan"))))
    assert not engine.has_work()
