"""QuantExperts (torch reference): tensor names, MoE math against transformers' experts,
expert ranges, routing edge cases."""

from __future__ import annotations

import pytest
import torch
from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

from baton.kernels import QuantExperts, nvfp4

E4M3 = torch.float8_e4m3fn


def random_experts(e, i, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(e, i, k, generator=gen) / k ** 0.5,
            torch.randn(e, k, i, generator=gen) / i ** 0.5)


def random_routing(t, e, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    return ids, torch.rand(t, k, generator=gen)


def moe_dense(x, up, down, ids, weights):
    """Token by token, slot by slot, in float64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = torch.relu(up[e].double() @ x[t].double()) ** 2
            out[t] += weights[t, j].double() * (down[e].double() @ h)
    return out


def test_state_dict_names_per_format():
    def names(fmt, **kw):
        return {k: (v.dtype, tuple(v.shape))
                for k, v in QuantExperts(4, 32, 48, fmt, **kw).state_dict().items()}

    assert names("bf16") == {"up_weight": (torch.bfloat16, (4, 48, 32)),
                             "down_weight": (torch.bfloat16, (4, 32, 48))}
    assert names("nvfp4") == {
        "up_weight": (torch.uint8, (4, 48, 16)), "up_weight_scale": (E4M3, (4, 48, 2)),
        "up_weight_scale_2": (torch.float32, (4,)), "up_input_scale": (torch.float32, (4,)),
        "down_weight": (torch.uint8, (4, 32, 24)), "down_weight_scale": (E4M3, (4, 32, 3)),
        "down_weight_scale_2": (torch.float32, (4,)), "down_input_scale": (torch.float32, (4,))}
    assert set(names("w4a16_nvfp4")) == {"up_weight", "up_weight_scale", "up_weight_scale_2",
                                         "down_weight", "down_weight_scale",
                                         "down_weight_scale_2"}
    assert names("fp8") == {
        "up_weight": (E4M3, (4, 48, 32)), "up_weight_scale": (torch.float32, (4,)),
        "up_input_scale": (torch.float32, (4,)), "down_weight": (E4M3, (4, 32, 48)),
        "down_weight_scale": (torch.float32, (4,)), "down_input_scale": (torch.float32, (4,))}
    assert names("fp8", fp8_per_channel=True)["up_weight_scale"] == (torch.float32, (4, 48))
    assert names("bf16", expert_range=(1, 3))["up_weight"] == (torch.bfloat16, (2, 48, 32))


def test_matches_transformers_experts_in_fp32():
    e, i, k, t, topk = 6, 24, 16, 11, 2
    up, down = random_experts(e, i, k)
    config = NemotronHConfig(hidden_size=k, n_routed_experts=e, moe_intermediate_size=i,
                             num_experts_per_tok=topk)
    hf = NemotronHExperts(config)
    with torch.no_grad():
        hf.up_proj.copy_(up)
        hf.down_proj.copy_(down)
    ids, weights = random_routing(t, e, topk)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(1))
    ours = QuantExperts.from_float(up, down, "bf16", torch.float32)
    torch.testing.assert_close(ours(x, ids, weights), hf(x, ids, weights), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_bf16_format_matches_dense_loop(dtype, tol):
    e, i, k, t, topk = 5, 32, 16, 7, 3
    up, down = random_experts(e, i, k, seed=2)
    ids, weights = random_routing(t, e, topk, seed=3)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(4)).to(dtype)
    module = QuantExperts.from_float(up, down, "bf16", dtype)
    ref = moe_dense(x, module.up_weight, module.down_weight, ids, weights)
    out = module(x, ids, weights)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("fmt", ["nvfp4", "w4a16_nvfp4", "fp8"])
def test_quantized_formats_compute_with_dequantized_weights(fmt):
    e, i, k, t, topk = 4, 32, 16, 9, 2
    up, down = random_experts(e, i, k, seed=5)
    ids, weights = random_routing(t, e, topk, seed=6)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(7))
    module = QuantExperts.from_float(up, down, fmt, torch.float32)
    if fmt == "fp8":
        up_dq = module.up_weight.float() * module.up_weight_scale[:, None, None]
        down_dq = module.down_weight.float() * module.down_weight_scale[:, None, None]
    else:
        up_dq = nvfp4.dequantize_ref(module.up_weight, module.up_weight_scale,
                                     module.up_weight_scale_2, torch.float32)
        down_dq = nvfp4.dequantize_ref(module.down_weight, module.down_weight_scale,
                                       module.down_weight_scale_2, torch.float32)
        assert torch.equal(module.up_weight_scale_2, up.abs().amax((1, 2)) / 2688)
    torch.testing.assert_close(module(x, ids, weights).double(),
                               moe_dense(x, up_dq, down_dq, ids, weights), rtol=1e-5, atol=1e-5)
    # ... and approximate the float experts.
    dense = moe_dense(x, up, down, ids, weights)
    assert (module(x, ids, weights).double() - dense).norm() / dense.norm() < 0.25


def test_expert_ranges_partition_the_output():
    e, i, k, t, topk = 6, 16, 16, 10, 2
    up, down = random_experts(e, i, k, seed=8)
    ids, weights = random_routing(t, e, topk, seed=9)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(10))
    full = QuantExperts.from_float(up, down, "nvfp4", torch.float32)
    token_ids = torch.arange(t).repeat_interleave(topk)
    full_pairs = full.expert_outputs(x, token_ids, ids.reshape(-1), weights.reshape(-1))
    total = torch.zeros_like(full_pairs)
    for first, last in ((0, 2), (2, 5), (5, 6)):
        part = QuantExperts.from_float(up[first:last], down[first:last], "nvfp4", torch.float32,
                                       expert_range=(first, last), num_experts=e)
        pairs = part.expert_outputs(x, token_ids, ids.reshape(-1), weights.reshape(-1))
        held = (ids.reshape(-1) >= first) & (ids.reshape(-1) < last)
        assert torch.all(pairs[~held] == 0)
        # Each pair depends on its own token and expert only: the same bits as the full stack.
        assert torch.equal(pairs[held], full_pairs[held])
        total += pairs
    assert torch.equal(total, full_pairs)


def test_routing_edge_cases():
    e, i, k = 4, 16, 16
    up, down = random_experts(e, i, k, seed=11)
    module = QuantExperts.from_float(up, down, "bf16", torch.float32)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(12))
    # All tokens on one expert (experts 0, 1, 3 get none), top-1.
    ids = torch.full((5, 1), 2, dtype=torch.int64)
    w = torch.rand(5, 1)
    torch.testing.assert_close(module(x, ids, w).double(), moe_dense(x, up, down, ids, w),
                               rtol=1e-5, atol=1e-6)
    # No tokens at all.
    empty = module(x[:0], ids[:0], w[:0])
    assert empty.shape == (0, k)
    # A token choosing the same expert twice counts it twice.
    ids = torch.tensor([[1, 1]])
    w = torch.tensor([[0.25, 0.5]])
    torch.testing.assert_close(module(x[:1], ids, w).double(),
                               moe_dense(x[:1], up, down, ids, w), rtol=1e-5, atol=1e-6)


def test_bad_arguments_raise_clear_errors():
    module = QuantExperts(4, 16, 32, "bf16", torch.float32)
    x = torch.zeros(3, 16)
    ids = torch.zeros(3, 2, dtype=torch.int64)
    w = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="x must be"):
        module(torch.zeros(3, 15), ids, w)
    with pytest.raises(ValueError, match="topk_ids must be int64"):
        module(x, ids.int(), w)
    with pytest.raises(ValueError, match="topk_weights must be float32"):
        module(x, ids, w.double())
    with pytest.raises(ValueError, match=r"expert ids span \[0, 4\]"):
        module(x, torch.tensor([[0, 4]] * 3), w)
    with pytest.raises(ValueError, match="expert_range"):
        QuantExperts(4, 16, 32, expert_range=(2, 5))
    with pytest.raises(ValueError, match="intermediate=40"):
        QuantExperts(4, 16, 40, "nvfp4")
    with pytest.raises(ValueError, match="up must be"):
        QuantExperts.from_float(torch.zeros(2, 8, 16), torch.zeros(2, 8, 16))
