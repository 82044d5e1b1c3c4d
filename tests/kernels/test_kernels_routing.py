"""route() against transformers' NemotronHTopkRouter, bit for bit."""

from __future__ import annotations

import pytest
import torch
from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHTopkRouter

from baton.kernels import route


def hf_router(num_experts, top_k, n_group, topk_group, norm, factor, hidden=24, seed=0):
    config = NemotronHConfig(hidden_size=hidden, n_routed_experts=num_experts,
                             num_experts_per_tok=top_k, n_group=n_group, topk_group=topk_group,
                             norm_topk_prob=norm, routed_scaling_factor=factor)
    router = NemotronHTopkRouter(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(num_experts, hidden, generator=gen))
        router.e_score_correction_bias.copy_(torch.rand(num_experts, generator=gen) * 0.2)
    return router


@pytest.mark.parametrize(
    "num_experts,top_k,n_group,topk_group,norm,factor",
    [(8, 2, 1, 1, True, 1.0), (16, 4, 4, 2, True, 2.5), (12, 3, 3, 1, False, 1.0),
     (64, 6, 8, 4, True, 2.827)],
)
def test_route_equals_transformers_bit_for_bit(num_experts, top_k, n_group, topk_group, norm,
                                                factor):
    router = hf_router(num_experts, top_k, n_group, topk_group, norm, factor)
    x = torch.randn(37, 24, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    logits, hf_weights, hf_ids = router(x)
    weights, ids = route(logits, router.e_score_correction_bias, top_k, n_group, topk_group,
                         norm, factor)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids, hf_ids)
    assert torch.equal(weights.view(torch.int32), hf_weights.view(torch.int32))


def test_route_semantics_independently():
    logits = torch.tensor([[0.0, 2.0, -1.0, 1.0, 3.0, -2.0]])
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0, 0.0, 0.0])
    weights, ids = route(logits, bias, top_k=2, n_group=1, topk_group=1, norm_topk_prob=True,
                         routed_scaling_factor=2.0)
    order = torch.argsort(ids[0])
    ids, weights = ids[0][order], weights[0][order]
    # The bias picks expert 2, but its weight is its unbiased score.
    assert ids.tolist() == [2, 4]
    s = torch.sigmoid(torch.tensor([-1.0, 3.0]))
    torch.testing.assert_close(weights, s / s.sum() * 2.0)
    # Group limit: groups {0,1,2}, {3,4,5}; keep one group.
    weights, ids = route(logits, None, top_k=2, n_group=2, topk_group=1, norm_topk_prob=False)
    assert sorted(ids[0].tolist()) == [3, 4]
    torch.testing.assert_close(weights[0].sort().values, torch.sigmoid(torch.tensor([1.0, 3.0])))


def test_route_rejects_bad_arguments():
    logits = torch.randn(3, 8)
    with pytest.raises(ValueError, match="n_group=3"):
        route(logits, None, 2, n_group=3)
    with pytest.raises(ValueError, match="top_k=9"):
        route(logits, None, 9)
    with pytest.raises(ValueError, match="topk_group=3"):
        route(logits, None, 2, n_group=2, topk_group=3)
    with pytest.raises(ValueError, match="float32"):
        route(logits.bfloat16(), None, 2)
    with pytest.raises(ValueError, match="correction_bias"):
        route(logits, torch.zeros(7), 2)
