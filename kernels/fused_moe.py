"""Fused MoE in Triton: (token, expert) pairs sorted by expert into block-aligned groups, a
grouped GEMM for the up projection with relu2 fused, a grouped GEMM for the down projection
with the routing weight applied, each pair's result written to its own row.

Shapes: `[T, K]`  T tokens, K in_features (the latent width in a LatentMoE), I intermediate,
E experts held, P (token, expert) pairs, BM the row tile, R = blocks * BM sorted rows.

Layout of the sorted pairs (built by align_pairs, without a host sync so the launch can be
captured in a CUDA graph):

    sorted_pairs  int32 [R]     pair ids grouped by local expert, each group padded to a
                                multiple of BM with the sentinel P; pairs of other ranks'
                                experts are left out
    block_expert  int32 [R/BM]  the local expert of each BM-row block, -1 past the last one
    hidden        [R, I]        relu2(up) in x.dtype, row i for sorted_pairs[i]
    out           fp32 [P, K]   weight * down(hidden): each pair written once (no atomics,
                                so repeated runs give the same bits); foreign pairs stay 0

QuantExperts.forward runs moe_forward (expert_outputs, then the slots of each token added in
order 0..k-1 by one kernel); batches of about one pair per expert go to moe_decode instead.

Weights are read in their stored format (WEIGHT_FMT): bf16/fp16/fp32 as is, NVFP4 decoded
from E2M1 + e4m3 block scales in registers (exact in bf16; the per-expert global scale is
applied to the fp32 accumulator), FP8 e4m3 decoded exactly with the per-expert (or
per-channel) scale applied to the accumulator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from baton.kernels.formats import WeightFormat
from baton.kernels.triton_common import INTERPRET, check_triton_device, e4m3_to_f32, to_dtype_rn
from baton.kernels.w4a16_gemm import load_nvfp4_tile

FMT_DENSE, FMT_NVFP4, FMT_FP8 = 0, 1, 2


@triton.jit
def _moe_gemm_kernel(
    # pointers
    a_ptr, w_ptr, w_scale_ptr, w_scale2_ptr, out_ptr,
    sorted_pairs_ptr, block_expert_ptr, token_ids_ptr, pair_weights_ptr,
    # sizes
    N, K, num_pairs,
    # strides
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_se, stride_sn,
    stride_om, stride_on,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    WEIGHT_FMT: tl.constexpr, PER_CHANNEL: tl.constexpr, UP: tl.constexpr,
    DOT_F32: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """UP: hidden[row] = relu(x[token(pair)] @ W_e.T)**2 for the block's sorted rows.
    not UP: out[pair] = weight(pair) * (hidden[row] @ W_e.T)."""
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:
        return
    expert = expert.to(tl.int64)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + rows)
    valid = pairs < num_pairs
    if UP:
        a_rows = tl.load(token_ids_ptr + pairs, mask=valid, other=0).to(tl.int64)
    else:
        a_rows = rows.to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_base = w_ptr + expert * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=valid[:, None] & (offs_k[None, :] < K), other=0.0)
        if WEIGHT_FMT == 1:
            w = load_nvfp4_tile(w_base, w_scale_ptr + expert * stride_se, offs_n, k0, N, K,
                                stride_wn, stride_sn, BLOCK_N, BLOCK_K)
        else:
            w_mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
            w_ptrs = w_base + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
            if WEIGHT_FMT == 2:
                w = e4m3_to_f32(tl.load(w_ptrs, mask=w_mask, other=0).to(tl.int32))
            else:
                w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        if DOT_F32:
            acc += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(w.to(a_ptr.dtype.element_ty)), acc)
    if WEIGHT_FMT == 1:
        acc = acc * tl.load(w_scale2_ptr + expert)
    if WEIGHT_FMT == 2:
        if PER_CHANNEL:
            acc = acc * tl.load(w_scale_ptr + expert * stride_se + offs_n, mask=offs_n < N,
                                other=0.0)[None, :]
        else:
            acc = acc * tl.load(w_scale_ptr + expert)
    n_mask = (offs_n < N)[None, :]
    if UP:
        acc = tl.maximum(acc, 0.0)
        acc = acc * acc
        out_ty: tl.constexpr = out_ptr.dtype.element_ty
        tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on,
                 to_dtype_rn(acc, out_ty, INTERPRETED), mask=valid[:, None] & n_mask)
    else:
        acc = acc * tl.load(pair_weights_ptr + pairs, mask=valid, other=0.0)[:, None]
        tl.store(out_ptr + pairs.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on,
                 acc, mask=valid[:, None] & n_mask)


@dataclass(frozen=True)
class MoEConfig:
    """Tiles of one grouped GEMM; block_k a multiple of 32 (NVFP4 bytes and scale blocks)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        if self.block_k % 32 or self.block_m < 16 or self.block_n < 16:
            raise ValueError(
                f"{self}: block_k must be a multiple of 32, block_m and block_n >= 16"
            )


def _pow2_at_least(value: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(value, 1))))


def moe_config(num_tokens: int, num_pairs: int, num_experts: int, n: int, k: int,
               device: torch.device) -> MoEConfig:
    """Tiles per shape. Decode-sized batches (T <= 64) give each expert a row or two: the
    smallest row tile with deep K tiles streams weights; prefill-sized batches fill large
    tiles for tensor-core throughput. The CPU interpreter gets few, large blocks."""
    if device.type != "cuda":
        return MoEConfig(16, _pow2_at_least(n, 16, 64), _pow2_at_least(k, 32, 128))
    rows_per_expert = num_pairs / max(num_experts, 1)
    if num_tokens <= 64 or rows_per_expert <= 16:
        return MoEConfig(16, 64, 128, num_warps=4, num_stages=4)
    # Compiled for sm_90, 128x128x64 tiles need more than 255 registers (spills); these
    # two do not (benchmarks/kernels/compile_check.py).
    if rows_per_expert <= 96:
        return MoEConfig(64, 128, 64, num_warps=4, num_stages=3)
    return MoEConfig(128, 64, 64, num_warps=8, num_stages=3)


@dataclass
class AlignedPairs:
    """Pairs grouped by local expert in BM-row blocks (see the module docstring)."""

    sorted_pairs: torch.Tensor  # int32 [R]
    block_expert: torch.Tensor  # int32 [R / BM], -1 for blocks past the last expert's
    block_m: int


@triton.jit
def _align_kernel(
    # pointers
    expert_ids_ptr, sorted_pairs_ptr, block_expert_ptr, shift_ptr,
    # sizes
    num_pairs, first, num_local, num_rows, num_blocks,
    # meta-parameters
    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
    FILL: tl.constexpr,
):
    """align_pairs in one program (P <= BLOCK_P): one launch instead of ~20 small torch ops.
    shift_ptr is int32 scratch [BLOCK_E]."""
    for start in range(0, num_rows, FILL):
        offs = start + tl.arange(0, FILL)
        tl.store(sorted_pairs_ptr + offs, num_pairs, mask=offs < num_rows)
    for start in range(0, num_blocks, FILL):
        offs = start + tl.arange(0, FILL)
        tl.store(block_expert_ptr + offs, -1, mask=offs < num_blocks)
    lanes = tl.arange(0, BLOCK_P)
    valid = lanes < num_pairs
    local = (tl.load(expert_ids_ptr + lanes, mask=valid, other=0) - first).to(tl.int32)
    held = valid & (local >= 0) & (local < num_local)
    key = tl.where(held, local, BLOCK_E - 1)  # the last bin (>= num_local) is dropped
    # A stable sort by expert: the lane rides in the low digits of the sort key.
    ordered = tl.sort(key * BLOCK_P + lanes)
    sorted_key = ordered // BLOCK_P
    sorted_pair = ordered % BLOCK_P
    experts = tl.arange(0, BLOCK_E)
    counts = tl.where(experts < num_local, tl.histogram(key, BLOCK_E), 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    # Row of the i-th sorted pair = its expert's padded start + (i - its expert's count start).
    tl.store(shift_ptr + experts,
             (tl.cumsum(padded, 0) - padded) - (tl.cumsum(counts, 0) - counts))
    tl.debug_barrier()  # the fills and the shifts are seen by every thread from here
    sorted_held = sorted_key < num_local
    row = tl.load(shift_ptr + sorted_key, mask=sorted_held, other=0) + lanes
    tl.store(sorted_pairs_ptr + row, sorted_pair, mask=sorted_held)
    # Every block of an expert's group starts with a real pair (padding ends a group).
    tl.store(block_expert_ptr + row // BLOCK_M, sorted_key,
             mask=sorted_held & (row % BLOCK_M == 0))


ALIGN_MAX_PAIRS = 2048  # one program sorts them; larger batches use the torch ops
ALIGN_MAX_EXPERTS = 1023


def align_pairs(expert_ids: torch.Tensor, first: int, num_local: int,
                block_m: int) -> AlignedPairs:
    """Sorts pair ids by local expert (stable), pads each expert's group to a multiple of
    block_m; one Triton program for up to ALIGN_MAX_PAIRS pairs, align_pairs_ref beyond.
    The buffers are sized by an upper bound, so nothing waits on the device."""
    p = expert_ids.numel()
    if p > ALIGN_MAX_PAIRS or num_local > ALIGN_MAX_EXPERTS or p == 0:
        return align_pairs_ref(expert_ids, first, num_local, block_m)
    check_triton_device(expert_ids)
    num_blocks = triton.cdiv(p, block_m) + min(num_local, p)
    rows = num_blocks * block_m
    device = expert_ids.device
    sorted_pairs = torch.empty(rows, dtype=torch.int32, device=device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=device)
    block_e = triton.next_power_of_2(num_local + 1)
    shift = torch.empty(block_e, dtype=torch.int32, device=device)
    _align_kernel[(1,)](expert_ids.contiguous(), sorted_pairs, block_expert, shift, p, first,
                        num_local, rows, num_blocks, BLOCK_P=max(16, triton.next_power_of_2(p)),
                        BLOCK_E=block_e, BLOCK_M=block_m, FILL=1024, num_warps=8)
    return AlignedPairs(sorted_pairs, block_expert, block_m)


def align_pairs_ref(expert_ids: torch.Tensor, first: int, num_local: int,
                    block_m: int) -> AlignedPairs:
    """align_pairs in torch ops (any size)."""
    p = expert_ids.numel()
    device = expert_ids.device
    local = expert_ids - first
    held = (local >= 0) & (local < num_local)
    key = torch.where(held, local, num_local)  # foreign pairs sort last, into a dropped bin
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(num_local + 1, dtype=torch.int64, device=device)
    counts.index_add_(0, key, torch.ones_like(key))
    padded = (counts + block_m - 1) // block_m * block_m
    padded[num_local] = 0
    pad_end = torch.cumsum(padded, 0)
    count_start = torch.cumsum(counts, 0) - counts
    sorted_key = key[order]
    position = pad_end[sorted_key] - padded[sorted_key] + (
        torch.arange(p, device=device) - count_start[sorted_key])
    num_blocks = triton.cdiv(p, block_m) + min(num_local, p)
    rows = num_blocks * block_m
    position = torch.where(sorted_key < num_local, position, rows)  # the dropped slot
    sorted_pairs = torch.full((rows + 1,), p, dtype=torch.int32, device=device)
    sorted_pairs[position] = order.to(torch.int32)
    block_starts = torch.arange(num_blocks, device=device) * block_m
    block_expert = torch.searchsorted(pad_end[:num_local].contiguous(), block_starts,
                                      right=True)
    block_expert = torch.where(block_expert < num_local, block_expert, -1).to(torch.int32)
    return AlignedPairs(sorted_pairs[:rows], block_expert, block_m)


def expert_weight_args(module, prefix: str):
    """(weight, scale, scale_2, WEIGHT_FMT) of a QuantExperts projection, as kernels take them
    (e4m3 tensors viewed as uint8; unused slots repeat the weight)."""
    w = getattr(module, f"{prefix}_weight")
    if module.fmt is WeightFormat.BF16:
        return w, w, w, FMT_DENSE
    if module.fmt is WeightFormat.FP8:
        scale = getattr(module, f"{prefix}_weight_scale")
        return w.view(torch.uint8), scale, scale, FMT_FP8
    scale = getattr(module, f"{prefix}_weight_scale").view(torch.uint8)
    return w, scale, getattr(module, f"{prefix}_weight_scale_2"), FMT_NVFP4


def _launch(a, w, scale, scale2, fmt, out, aligned, token_ids, pair_weights, n, k,
            num_pairs, cfg: MoEConfig, up: bool, per_channel: bool):
    a_dtype = a.dtype
    grid = (aligned.block_expert.numel(), triton.cdiv(n, cfg.block_n))
    _moe_gemm_kernel[grid](
        a, w, scale, scale2, out,
        aligned.sorted_pairs, aligned.block_expert, token_ids, pair_weights,
        n, k, num_pairs,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1),
        w.stride(2) if fmt != FMT_NVFP4 else 1,
        scale.stride(0) if scale.dim() > 1 else 0, scale.stride(1) if scale.dim() > 1 else 0,
        out.stride(0), out.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        WEIGHT_FMT=fmt, PER_CHANNEL=per_channel, UP=up,
        DOT_F32=a_dtype == torch.float32 or (INTERPRET and a_dtype == torch.bfloat16),
        INTERPRETED=INTERPRET, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def expert_outputs(module, x: torch.Tensor, token_ids: torch.Tensor, expert_ids: torch.Tensor,
                   weights: torch.Tensor, config: MoEConfig | None = None) -> torch.Tensor:
    """QuantExperts' Triton path: weighted (token, expert) pair outputs -> fp32 [P, K].

    Pairs whose expert lies outside module.expert_range give 0 rows. See
    QuantExperts.expert_outputs for the contract.
    """
    p = expert_ids.numel()
    k_dim, i_dim = module.in_features, module.intermediate
    if token_ids.shape != (p,) or weights.shape != (p,):
        raise ValueError(
            f"token_ids, expert_ids and weights must be [P] alike; got {tuple(token_ids.shape)}"
            f", {tuple(expert_ids.shape)}, {tuple(weights.shape)}"
        )
    if x.dim() != 2 or x.shape[1] != k_dim:
        raise ValueError(f"x must be [T, {k_dim}] (in_features), got {tuple(x.shape)}")
    check_triton_device(x, module.up_weight)
    first, last = module.expert_range
    # Only held pairs are written: with every expert held (ids come from the router, in
    # range) no row is left, and zeroing P x K fp32 would cost a pass over the output.
    holds_all = (first, last) == (0, module.num_experts)
    out = (torch.empty if holds_all else torch.zeros)(p, k_dim, dtype=torch.float32,
                                                       device=x.device)
    if p == 0:
        return out
    num_local = last - first
    cfg = config or moe_config(x.shape[0], p, num_local, max(i_dim, k_dim), k_dim, x.device)
    aligned = align_pairs(expert_ids, first, num_local, cfg.block_m)
    token_ids = token_ids.to(torch.int32).contiguous()
    weights = weights.to(torch.float32).contiguous()
    hidden = torch.empty(aligned.sorted_pairs.numel(), i_dim, dtype=x.dtype, device=x.device)
    per_channel = module.fp8_per_channel
    up_w, up_s, up_s2, fmt = expert_weight_args(module, "up")
    _launch(x, up_w, up_s, up_s2, fmt, hidden, aligned, token_ids, weights, i_dim, k_dim, p, cfg,
            up=True, per_channel=per_channel)
    down_w, down_s, down_s2, fmt = expert_weight_args(module, "down")
    _launch(hidden, down_w, down_s, down_s2, fmt, out, aligned, token_ids, weights, k_dim, i_dim,
            p, cfg, up=False, per_channel=per_channel)
    return out


@triton.jit
def _combine_kernel(
    # pointers
    slots_ptr, out_ptr,
    # sizes
    K,
    # strides
    stride_st, stride_sj, stride_ot,
    # meta-parameters
    TOP_K: tl.constexpr, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """out[t] = slots[t, 0] + slots[t, 1] + ... in slot order, fp32, then x.dtype."""
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K
    row = slots_ptr + token * stride_st + offs
    total = tl.load(row, mask=mask, other=0.0)
    for j in range(1, TOP_K):
        total += tl.load(row + j * stride_sj, mask=mask, other=0.0)
    out_ty: tl.constexpr = out_ptr.dtype.element_ty
    tl.store(out_ptr + token * stride_ot + offs, to_dtype_rn(total, out_ty, INTERPRETED),
             mask=mask)


def combine_slots_triton(slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[T, k, K] fp32 -> [T, K] in `dtype`: the same bits as combine_slots(slots).to(dtype)."""
    t, k, width = slots.shape
    out = torch.empty(t, width, dtype=dtype, device=slots.device)
    if t == 0:
        return out
    slots = slots.contiguous()
    block = min(1024, triton.next_power_of_2(width))
    _combine_kernel[(t, triton.cdiv(width, block))](
        slots, out, width, slots.stride(0), slots.stride(1), out.stride(0),
        TOP_K=k, BLOCK=block, INTERPRETED=INTERPRET)
    return out


def moe_forward(module, x: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
    """QuantExperts.forward on the sorted path: x [T, K] -> [T, K] in x.dtype."""
    t, k = topk_ids.shape
    token_ids = torch.arange(t, device=x.device).repeat_interleave(k)
    slots = expert_outputs(module, x, token_ids, topk_ids.reshape(-1), topk_weights.reshape(-1))
    return combine_slots_triton(slots.view(t, k, module.in_features), x.dtype)
