"""MoE in Triton (the sorted fused path and the decode path) against QuantExperts' torch
reference: formats, dtypes, odd shapes, an expert with no tokens, all tokens on one expert,
T not a power of two, expert ranges."""

from __future__ import annotations

import pytest
import torch

from baton.kernels import QuantExperts, fused_moe, moe_decode, route, set_backend
from baton.kernels.experts import combine_slots
from baton.kernels.fused_moe import MoEConfig, align_pairs, expert_outputs, moe_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


def experts(e, i, k, fmt, dtype, seed=0, expert_range=None, per_channel=False):
    gen = torch.Generator().manual_seed(seed)
    up = torch.randn(e, i, k, generator=gen) / k ** 0.5
    down = torch.randn(e, k, i, generator=gen) / i ** 0.5
    first, last = expert_range or (0, e)
    return QuantExperts.from_float(up[first:last].to(DEVICE), down[first:last].to(DEVICE), fmt,
                                   dtype, expert_range=expert_range, num_experts=e,
                                   fp8_per_channel=per_channel)


def routing(t, e, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=gen)
    weights, ids = route(logits, None, k)
    return ids.to(DEVICE), weights.to(DEVICE)


def assert_close(out, ref, dtype):
    scale = ref.float().abs().max().clamp(min=1.0)
    torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype] * scale)


DECODE_CHECK_PAIRS = 24  # the interpreter runs one program per pair: keep those batches small


def both_backends(module, x, ids, weights):
    """The reference, and the Triton paths: the sorted one always, the decode one (checked
    per pair too) on batches of at most DECODE_CHECK_PAIRS pairs (or any on the GPU)."""
    set_backend(module, "torch")
    ref = module(x, ids, weights)
    set_backend(module, "triton")
    t, k = ids.shape
    outs = [fused_moe.moe_forward(module, x, ids, weights)]
    if t * k <= DECODE_CHECK_PAIRS or DEVICE == "cuda":
        outs.append(moe_decode.moe_decode(module, x, ids, weights))
        tokens = torch.arange(t, device=x.device).repeat_interleave(k)
        flat_ids, flat_w = ids.reshape(-1), weights.reshape(-1)
        assert_close(moe_decode.expert_outputs_decode(module, x, tokens, flat_ids, flat_w),
                     module._expert_outputs_ref(x, tokens, flat_ids, flat_w),
                     torch.float32 if x.dtype == torch.float32 else torch.bfloat16)
    for out in outs:
        assert out.dtype == x.dtype and out.shape == x.shape
    decode = moe_decode.use_decode_path(t * k, module.num_local_experts)
    if not decode or len(outs) == 2:  # whichever path the batch size picks
        assert torch.equal(module(x, ids, weights), outs[1 if decode else 0])
    return outs, ref


def assert_paths_close(outs, ref, dtype):
    for out in outs:
        assert_close(out, ref, dtype)


@pytest.mark.parametrize("fmt", ["bf16", "nvfp4", "w4a16_nvfp4", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_formats_and_dtypes(fmt, dtype):
    module = experts(6, 48, 32, fmt, dtype, seed=1)
    ids, weights = routing(13, 6, 2, seed=2)
    x = torch.randn(13, 32, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    outs, ref = both_backends(module, x, ids, weights)
    assert_paths_close(outs, ref, dtype)


def test_fp8_per_channel():
    module = experts(4, 32, 32, "fp8", torch.bfloat16, seed=4, per_channel=True)
    ids, weights = routing(9, 4, 2, seed=5)
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(6)).bfloat16().to(DEVICE)
    outs, ref = both_backends(module, x, ids, weights)
    assert_paths_close(outs, ref, torch.bfloat16)


def test_odd_shapes_empty_expert_and_all_on_one_expert():
    # K = 80 and I = 112 are no powers of two; T = 37.
    module = experts(5, 112, 80, "nvfp4", torch.bfloat16, seed=7)
    x = torch.randn(37, 80, generator=torch.Generator().manual_seed(8)).bfloat16().to(DEVICE)
    ids, weights = routing(37, 5, 2, seed=9)
    ids = torch.where(ids == 3, 1, ids)  # expert 3 gets no tokens
    ids[:, 1] = torch.where(ids[:, 0] == 1, 0, 1)
    for rows in (slice(None), slice(0, 11)):  # 37 tokens: sorted path; 11: decode path too
        outs, ref = both_backends(module, x[rows], ids[rows], weights[rows])
        assert_paths_close(outs, ref, torch.bfloat16)
    one = torch.full((37, 1), 4, dtype=torch.int64, device=DEVICE)
    for rows in (slice(None), slice(0, 9)):
        outs, ref = both_backends(module, x[rows], one[rows], weights[rows, :1].contiguous())
        assert_paths_close(outs, ref, torch.bfloat16)


def test_expert_range_leaves_foreign_pairs_zero_and_tiles_do_not_matter():
    module = experts(8, 64, 32, "nvfp4", torch.bfloat16, seed=10, expert_range=(3, 6))
    set_backend(module, "triton")
    ids, weights = routing(11, 8, 3, seed=11)
    x = torch.randn(11, 32, generator=torch.Generator().manual_seed(12)).bfloat16().to(DEVICE)
    tokens = torch.arange(11, device=DEVICE).repeat_interleave(3)
    flat_ids, flat_w = ids.reshape(-1), weights.reshape(-1)
    out = module.expert_outputs(x, tokens, flat_ids, flat_w)
    held = (flat_ids >= 3) & (flat_ids < 6)
    assert torch.all(out[~held] == 0) and torch.all(out[held].abs().sum(1) > 0)
    ref = module._expert_outputs_ref(x, tokens, flat_ids, flat_w)
    assert_close(out, ref, torch.bfloat16)
    # Another row tile still gives each pair the same result (within rounding).
    other = expert_outputs(module, x, tokens, flat_ids, flat_w, config=MoEConfig(32, 32, 32))
    assert_close(other, ref, torch.bfloat16)


def test_empty_batch_and_duplicate_expert():
    module = experts(4, 32, 32, "bf16", torch.float32, seed=13)
    set_backend(module, "triton")
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(14)).to(DEVICE)
    ids = torch.zeros(3, 2, dtype=torch.int64, device=DEVICE)
    weights = torch.rand(3, 2, generator=torch.Generator().manual_seed(15)).to(DEVICE)
    assert module(x[:0], ids[:0], weights[:0]).shape == (0, 32)
    assert moe_decode.moe_decode(module, x[:0], ids[:0], weights[:0]).shape == (0, 32)
    assert fused_moe.moe_forward(module, x[:0], ids[:0], weights[:0]).shape == (0, 32)
    outs, ref = both_backends(module, x, ids, weights)
    assert_paths_close(outs, ref, torch.float32)


def test_align_pairs_layout():
    expert_ids = torch.tensor([5, 2, 2, 9, 5, 2, 0, 7, 2], device=DEVICE)
    aligned = align_pairs(expert_ids, first=2, num_local=4, block_m=2)  # experts 2..5
    sorted_pairs = aligned.sorted_pairs.cpu().tolist()
    blocks = aligned.block_expert.cpu().tolist()
    p = expert_ids.numel()
    # Expert 2 (local 0): pairs 1, 2, 5, 8 in order; expert 5 (local 3): 0, 4; 3 and 4: none.
    assert sorted_pairs[:6] == [1, 2, 5, 8, 0, 4]
    assert all(s == p for s in sorted_pairs[6:])
    assert blocks[:3] == [0, 0, 3] and all(b == -1 for b in blocks[3:])
    assert len(sorted_pairs) == len(blocks) * 2
    # Padding: 3 pairs of one expert with block 2 -> one padded slot.
    aligned = align_pairs(torch.tensor([1, 1, 1], device=DEVICE), 0, 2, 2)
    assert aligned.sorted_pairs.cpu().tolist()[:4] == [0, 1, 2, 3]
    assert aligned.block_expert.cpu().tolist()[:2] == [1, 1]


@pytest.mark.parametrize("pairs,experts,first,num_local,block_m", [
    (9, 10, 2, 4, 2), (100, 16, 0, 16, 16), (37, 8, 3, 3, 16), (2048, 128, 0, 128, 64),
    (1, 4, 0, 4, 16), (64, 512, 100, 256, 16)])
def test_align_kernel_equals_torch_ops(pairs, experts, first, num_local, block_m):
    ids = torch.randint(0, experts, (pairs,), generator=torch.Generator().manual_seed(pairs))
    ids = ids.to(DEVICE)
    got = align_pairs(ids, first, num_local, block_m)
    want = fused_moe.align_pairs_ref(ids, first, num_local, block_m)
    assert torch.equal(got.sorted_pairs, want.sorted_pairs)
    assert torch.equal(got.block_expert, want.block_expert)


def test_config_per_shape():
    cuda = torch.device("cuda")
    decode = moe_config(8, 48, 128, 2688, 2688, cuda)
    prefill = moe_config(8192, 8192 * 6, 128, 2688, 2688, cuda)
    assert decode.block_m == 16 and prefill.block_m == 128
    assert moe_config(512, 512 * 6, 128, 2688, 2688, cuda).block_m == 64


def test_combine_kernel_has_the_reference_bits():
    gen = torch.Generator().manual_seed(16)
    slots = torch.randn(7, 5, 40, generator=gen)
    slots[0, :, 0] = -0.0  # a sum of negative zeros stays negative
    for dtype in (torch.bfloat16, torch.float32):
        got = fused_moe.combine_slots_triton(slots.to(DEVICE), dtype).cpu()
        want = combine_slots(slots).to(dtype)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_decode_path_choice():
    assert moe_decode.use_decode_path(6, 128) and moe_decode.use_decode_path(128, 128)
    assert not moe_decode.use_decode_path(192, 128)
    assert moe_decode.use_decode_path(12, 4)  # tiny batches never sort


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 7, 32, 129, 2048])
@pytest.mark.parametrize("fmt", ["bf16", "nvfp4"])
def test_gpu_nano_shapes(t, fmt):
    module = experts(128, 1856, 2688, fmt, torch.bfloat16, seed=t)
    ids, weights = routing(t, 128, 6, seed=t)
    x = torch.randn(t, 2688, generator=torch.Generator().manual_seed(t)).bfloat16().to(DEVICE)
    outs, ref = both_backends(module, x, ids, weights)
    assert_paths_close(outs, ref, torch.bfloat16)
    assert torch.equal(module(x, ids, weights), module(x, ids, weights))  # deterministic


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 32, 512])
def test_gpu_latent_moe_shapes(t):
    module = experts(512, 2688, 1024, "nvfp4", torch.bfloat16, seed=t)
    ids, weights = routing(t, 512, 22, seed=t)
    x = torch.randn(t, 1024, generator=torch.Generator().manual_seed(t)).bfloat16().to(DEVICE)
    outs, ref = both_backends(module, x, ids, weights)
    assert_paths_close(outs, ref, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [2, 64])  # the decode path and the sorted path
def test_gpu_moe_captures_in_a_cuda_graph(t):
    # Nothing on the Triton path waits on the device, so a step can be replayed as a graph.
    module = experts(64, 256, 512, "nvfp4", torch.bfloat16, seed=t)
    set_backend(module, "triton")
    ids, weights = routing(t, 64, 4, seed=t)
    x = torch.randn(t, 512, generator=torch.Generator().manual_seed(t)).bfloat16().to(DEVICE)
    eager = module(x, ids, weights)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        module(x, ids, weights)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = module(x, ids, weights)
    x.copy_(torch.randn(t, 512, generator=torch.Generator().manual_seed(99)).bfloat16())
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, module(x, ids, weights)) and not torch.equal(out, eager)
