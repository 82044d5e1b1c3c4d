"""Sampler: parameter validation, counter-based noise, exactness of the sampled distribution."""

from __future__ import annotations

import math

import pytest
import torch

from baton.workers.engine.sampling import (
    SampleRow,
    SamplingParams,
    filter_logits,
    row_key,
    sample_tokens,
    token_logprobs,
    uniform_noise,
    unit_interval,
)


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_tokens", -1),
        ("max_tokens", 0),
        ("temperature", -0.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("seed", -3),
        ("stop", "abc"),
        ("stop_token_ids", [-1]),
        ("logprobs", 99),
    ],
)
def test_validate_names_the_field(field, value):
    params = SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=field):
        params.validate()


def test_validate_accepts_defaults_and_common_settings():
    SamplingParams().validate()
    SamplingParams(
        max_tokens=5,
        temperature=0,
        top_p=0.9,
        top_k=40,
        seed=7,
        stop=["\n"],
        stop_token_ids=[2],
        logprobs=3,
        ignore_eos=True,
    ).validate()


def test_noise_is_a_pure_function_of_key_and_token():
    keys = [row_key(123, p) for p in range(5)]
    a = uniform_noise(keys, 1000, "cpu")
    b = uniform_noise(list(reversed(keys)), 1000, "cpu").flip(0)
    assert torch.equal(a, b)
    # A row alone equals the same row inside a batch.
    assert torch.equal(uniform_noise(keys[2:3], 1000, "cpu")[0], a[2])
    assert (a > 0).all() and (a < 1).all()
    # Different positions and seeds give different draws.
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(uniform_noise([row_key(124, 0)], 1000, "cpu")[0], a[0])
    # Rows are not shuffled copies of each other, and are uncorrelated.
    assert not torch.equal(a[0].sort().values, a[1].sort().values)
    centered = a - 0.5
    corr = (centered[0] * centered[1]).mean() / centered[0].var()
    assert abs(float(corr)) < 0.15
    # Roughly uniform: mean 1/2, variance 1/12.
    big = uniform_noise([row_key(5, p) for p in range(64)], 4096, "cpu")
    assert abs(big.mean().item() - 0.5) < 0.005
    assert abs(big.var().item() - 1 / 12) < 0.002


def test_seeded_sample_matches_the_tempered_distribution():
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    params = SamplingParams(temperature=0.7, seed=11)
    n = 6000
    rows = [SampleRow(params, seed=11, position=p) for p in range(n)]
    tokens = sample_tokens(logits.expand(n, -1), rows)
    freq = torch.bincount(tokens, minlength=12).float() / n
    expect = torch.softmax(logits[0] / 0.7, dim=-1)
    # 4 standard errors of a binomial share
    tol = 4 * torch.sqrt(expect * (1 - expect) / n) + 1e-3
    assert ((freq - expect).abs() <= tol).all(), (freq, expect)


def test_same_seed_and_position_give_the_same_token_in_any_batch():
    torch.manual_seed(1)
    logits = torch.randn(8, 50)
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(8)]
    rows = [SampleRow(p, seed=p.seed, position=10 + i) for i, p in enumerate(params)]
    batch = sample_tokens(logits, rows)
    single = torch.stack([sample_tokens(logits[i : i + 1], rows[i : i + 1])[0] for i in range(8)])
    assert torch.equal(batch, single)
    # Mixed with greedy rows, the sampled rows do not move.
    greedy = SampleRow(SamplingParams(temperature=0), seed=0, position=0)
    mixed = sample_tokens(torch.cat([logits[:1], logits]), [greedy, *rows])
    assert mixed[0] == logits[0].argmax() and torch.equal(mixed[1:], batch)


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    keep = lambda **kw: torch.isfinite(  # noqa: E731
        filter_logits(logits, [SampleRow(SamplingParams(**kw), 0, 0)])
    )[0].tolist()
    assert keep(top_k=2) == [True, True, False, False]
    assert keep(top_p=0.5) == [True, False, False, False]
    assert keep(top_p=0.6) == [True, True, False, False]
    assert keep(top_p=0.9) == [True, True, True, False]
    assert keep(top_p=1.0) == [True] * 4
    assert keep(top_k=3, top_p=0.7) == [True, True, False, False]
    rows = [SampleRow(SamplingParams(top_k=1, temperature=5.0, seed=3), 3, p) for p in range(50)]
    assert (sample_tokens(logits.expand(50, -1), rows) == 0).all()


def test_logprobs_of_chosen_and_top_tokens():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 5.0]])
    out = token_logprobs(logits, torch.tensor([2, 2]), [2, 0])
    logp = torch.log_softmax(logits, -1)
    assert math.isclose(out[0].logprob, logp[0, 2].item(), rel_tol=1e-6)
    assert [t for t, _ in out[0].top] == [1, 2]
    assert out[1].top == []


def test_rejection_rule_keeps_the_target_distribution():
    from baton.workers.engine.sampling import draft_tokens, rejection_verify

    torch.manual_seed(3)
    target = torch.randn(2, 6) * 1.5  # positions N (verified draft) and N + 1 (bonus)
    draft = torch.randn(1, 6) * 1.5
    n = 1200
    params = [SamplingParams(temperature=1.0, seed=seed) for seed in range(n)]
    tokens, q = draft_tokens(draft.expand(n, -1), [SampleRow(p, p.seed, 50) for p in params])
    first, accepted = [], 0
    for p, token, q_row in zip(params, tokens.tolist(), q):
        rows = [SampleRow(p, p.seed, 50), SampleRow(p, p.seed, 51)]
        out = rejection_verify(target, q_row[None], [token], rows)
        first.append(out[0])
        accepted += len(out) == 2
    freq = torch.bincount(torch.tensor(first), minlength=6).float() / n
    expect = torch.softmax(target[0], dim=-1)
    tol = 4 * torch.sqrt(expect * (1 - expect) / n) + 1e-3
    assert ((freq - expect).abs() <= tol).all(), (freq, expect)
    # Acceptance rate is sum(min(p, q)) (1 - total variation distance).
    q = torch.softmax(draft[0], dim=-1)
    rate = float(torch.minimum(expect, q).sum())
    assert abs(accepted / n - rate) < 4 * (rate * (1 - rate) / n) ** 0.5 + 1e-3


def test_rejection_rule_greedy_is_argmax_matching():
    from baton.workers.engine.sampling import rejection_verify

    target = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    rows = [SampleRow(SamplingParams(temperature=0), 0, p) for p in range(3)]
    assert rejection_verify(target, None, [1, 0], rows) == [1, 0, 2]
    assert rejection_verify(target, None, [1, 2], rows) == [1, 0]
    assert rejection_verify(target, None, [2, 0], rows) == [1]


def test_noise_never_reaches_0_or_1_so_gumbel_stays_finite():
    u = unit_interval(torch.tensor([0, 1, 2**31, 2**32 - 2, 2**32 - 1], dtype=torch.int64))
    assert u.dtype == torch.float32
    assert float(u[0]) == 2**-24 and float(u[-1]) == 1 - 2**-24
    assert torch.isfinite(-torch.log(-torch.log(u))).all()
    # A masked row over a 128k vocabulary: only token 3 is allowed, and only it is drawn.
    logits = torch.full((64, 1 << 17), float("-inf"))
    logits[:, 3] = 0.0
    rows = [SampleRow(SamplingParams(temperature=1.0, seed=9), 9, p) for p in range(64)]
    assert sample_tokens(logits, rows).tolist() == [3] * 64
