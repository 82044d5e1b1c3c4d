"""MoE for decode-sized batches in Triton: no sort, one program per (pair, tile), two launches.

Shapes: `[T, K]`  T tokens, K in_features (the latent width in a LatentMoE), I intermediate,
k top-k, P = T * k (token, slot) pairs, E experts held.

When a batch has about one pair per expert (P <= E), sorting pairs into expert blocks buys
no weight reuse, and its dozen small launches would cost more than streaming the touched
experts' weights (Nano at T = 1 reads 34 MB: 11 us at 3 TB/s). Here each program reads its
expert id straight from the routing:

    up    grid (P, I / BLOCK_N): hidden[p] = relu(x[token(p)] @ W_up[e(p)].T)**2, x.dtype
    down  grid (T, K / BLOCK_N): for slot j = 0 .. k-1 in order, c_j = weight(p) * (hidden[p]
          @ W_down[e(p)].T) in fp32, out[t] = c_0 + c_1 + ... (the order combine_slots uses);
          or, per pair, out[p] = c (the rows expert parallelism sends back)

Products are CUDA-core dot products (tl.sum over a K tile): with one row per expert there is
nothing for a tensor core to share. Pairs of experts held elsewhere read no weights and add 0.
Weights are decoded as in fused_moe (bf16/fp16/fp32, NVFP4, FP8).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.kernels.fused_moe import FMT_FP8, FMT_NVFP4, expert_weight_args
from baton.kernels.triton_common import INTERPRET, check_triton_device, e4m3_to_f32, to_dtype_rn
from baton.kernels.w4a16_gemm import load_nvfp4_tile


@triton.jit
def _expert_row_dot(a_mask, w_ptr, w_scale_ptr, w_scale2_ptr, expert, held, offs_n,
                    N, K, stride_we, stride_wn, stride_wk, stride_se, stride_sn,
                    a_ptr_row, stride_ak,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WEIGHT_FMT: tl.constexpr,
                    PER_CHANNEL: tl.constexpr):
    """sum_k a[k] * W_e[n, k] for the BLOCK_N rows offs_n, with the expert's scales; 0 when
    the expert is not held (nothing is read then)."""
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    w_base = w_ptr + expert * stride_we
    n_mask = (offs_n < N) & held
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr_row + offs_k * stride_ak, mask=a_mask & (offs_k < K),
                    other=0.0).to(tl.float32)
        if WEIGHT_FMT == 1:
            w = load_nvfp4_tile(w_base, w_scale_ptr + expert * stride_se,
                                tl.where(n_mask, offs_n, N), k0, N, K, stride_wn, stride_sn,
                                BLOCK_N, BLOCK_K)
        else:
            w_mask = n_mask[:, None] & (offs_k[None, :] < K)
            w_ptrs = w_base + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
            if WEIGHT_FMT == 2:
                w = e4m3_to_f32(tl.load(w_ptrs, mask=w_mask, other=0).to(tl.int32))
            else:
                w = tl.load(w_ptrs, mask=w_mask, other=0.0).to(tl.float32)
        acc += tl.sum(w * a[None, :], axis=1)
    if WEIGHT_FMT == 1:
        acc = acc * tl.load(w_scale2_ptr + expert, mask=held, other=0.0)
    if WEIGHT_FMT == 2:
        if PER_CHANNEL:
            acc = acc * tl.load(w_scale_ptr + expert * stride_se + offs_n, mask=n_mask,
                                other=0.0)
        else:
            acc = acc * tl.load(w_scale_ptr + expert, mask=held, other=0.0)
    return acc


@triton.jit
def _moe_decode_up_kernel(
    # pointers
    x_ptr, w_ptr, w_scale_ptr, w_scale2_ptr, hidden_ptr, expert_ids_ptr, token_ids_ptr,
    # sizes
    N, K, first, num_local,
    # strides
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_se, stride_sn,
    stride_hm, stride_hn,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WEIGHT_FMT: tl.constexpr,
    PER_CHANNEL: tl.constexpr, INTERPRETED: tl.constexpr,
):
    pair = tl.program_id(0)
    expert = tl.load(expert_ids_ptr + pair) - first
    held = (expert >= 0) & (expert < num_local)
    expert = tl.where(held, expert, 0).to(tl.int64)
    token = tl.load(token_ids_ptr + pair).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _expert_row_dot(held, w_ptr, w_scale_ptr, w_scale2_ptr, expert, held, offs_n,
                          N, K, stride_we, stride_wn, stride_wk, stride_se, stride_sn,
                          x_ptr + token * stride_xm, stride_xk,
                          BLOCK_N, BLOCK_K, WEIGHT_FMT, PER_CHANNEL)
    acc = tl.maximum(acc, 0.0)
    acc = acc * acc
    out_ty: tl.constexpr = hidden_ptr.dtype.element_ty
    tl.store(hidden_ptr + pair.to(tl.int64) * stride_hm + offs_n * stride_hn,
             to_dtype_rn(acc, out_ty, INTERPRETED), mask=offs_n < N)


@triton.jit
def _moe_decode_down_kernel(
    # pointers
    hidden_ptr, w_ptr, w_scale_ptr, w_scale2_ptr, out_ptr, expert_ids_ptr, pair_weights_ptr,
    # sizes
    N, K, first, num_local,
    # strides
    stride_hm, stride_hk, stride_we, stride_wn, stride_wk, stride_se, stride_sn,
    stride_om, stride_on,
    # meta-parameters
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    WEIGHT_FMT: tl.constexpr, PER_CHANNEL: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """TOP_K slots per program, added in slot order (out row per token); TOP_K = 1 with one
    program per pair gives the per-pair rows."""
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in range(TOP_K):
        pair = row * TOP_K + j
        expert = tl.load(expert_ids_ptr + pair) - first
        held = (expert >= 0) & (expert < num_local)
        expert = tl.where(held, expert, 0).to(tl.int64)
        acc = _expert_row_dot(held, w_ptr, w_scale_ptr, w_scale2_ptr, expert, held, offs_n,
                              N, K, stride_we, stride_wn, stride_wk, stride_se, stride_sn,
                              hidden_ptr + pair * stride_hm, stride_hk,
                              BLOCK_N, BLOCK_K, WEIGHT_FMT, PER_CHANNEL)
        contribution = acc * tl.load(pair_weights_ptr + pair)
        # Slot 0 starts the sum (not 0.0 + c_0: that would turn a -0.0 into +0.0).
        total = tl.where(j == 0, contribution, total + contribution)
    out_ty: tl.constexpr = out_ptr.dtype.element_ty
    tl.store(out_ptr + row * stride_om + offs_n * stride_on,
             to_dtype_rn(total, out_ty, INTERPRETED), mask=offs_n < N)


def use_decode_path(num_pairs: int, num_local_experts: int) -> bool:
    """About one pair per expert or fewer: sorting into expert blocks would buy nothing."""
    return num_pairs <= max(num_local_experts, 16)


def _tiles(n: int, k: int, device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":  # the interpreter: few, large blocks
        return (max(16, min(64, triton.next_power_of_2(n))),
                max(32, min(128, triton.next_power_of_2(k))))
    return 16, 256 if k >= 256 else 128


def _launch_pair(module, x, token_ids, expert_ids, weights, out, combine_top_k: int):
    first, last = module.expert_range
    k_dim, i_dim = module.in_features, module.intermediate
    p = expert_ids.numel()
    per_channel = module.fp8_per_channel
    hidden = torch.empty(p, i_dim, dtype=x.dtype, device=x.device)
    expert_ids = expert_ids.contiguous()
    up_w, up_s, up_s2, fmt = expert_weight_args(module, "up")
    block_n, block_k = _tiles(i_dim, k_dim, x.device)
    _moe_decode_up_kernel[(p, triton.cdiv(i_dim, block_n))](
        x, up_w, up_s, up_s2, hidden, expert_ids, token_ids.contiguous(),
        i_dim, k_dim, first, last - first,
        x.stride(0), x.stride(1), *_weight_strides(up_w, up_s, fmt),
        hidden.stride(0), hidden.stride(1),
        BLOCK_N=block_n, BLOCK_K=block_k, WEIGHT_FMT=fmt, PER_CHANNEL=per_channel,
        INTERPRETED=INTERPRET,
    )
    down_w, down_s, down_s2, fmt = expert_weight_args(module, "down")
    block_n, block_k = _tiles(k_dim, i_dim, x.device)
    rows = p // combine_top_k
    _moe_decode_down_kernel[(rows, triton.cdiv(k_dim, block_n))](
        hidden, down_w, down_s, down_s2, out, expert_ids, weights.contiguous(),
        k_dim, i_dim, first, last - first,
        hidden.stride(0), hidden.stride(1), *_weight_strides(down_w, down_s, fmt),
        out.stride(0), out.stride(1),
        TOP_K=combine_top_k, BLOCK_N=block_n, BLOCK_K=block_k, WEIGHT_FMT=fmt,
        PER_CHANNEL=per_channel, INTERPRETED=INTERPRET,
    )
    return out


def _weight_strides(w, scale, fmt):
    return (w.stride(0), w.stride(1), w.stride(2) if fmt != FMT_NVFP4 else 1,
            scale.stride(0) if scale.dim() > 1 else 0,
            scale.stride(1) if scale.dim() > 1 and fmt != FMT_FP8 else 0)


def moe_decode(module, x: torch.Tensor, topk_ids: torch.Tensor,
               topk_weights: torch.Tensor) -> torch.Tensor:
    """x [T, K], topk_ids [T, k] int64, topk_weights [T, k] fp32 -> [T, K] in x.dtype, the
    slots added in order 0..k-1 in fp32 (as QuantExperts.forward defines)."""
    check_triton_device(x, module.up_weight)
    t, k = topk_ids.shape
    out = torch.empty(t, module.in_features, dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    token_ids = torch.arange(t, device=x.device, dtype=torch.int32).repeat_interleave(k)
    return _launch_pair(module, x, token_ids, topk_ids.reshape(-1),
                        topk_weights.reshape(-1).float(), out, combine_top_k=k)


def expert_outputs_decode(module, x: torch.Tensor, token_ids: torch.Tensor,
                          expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-pair weighted rows fp32 [P, K] (QuantExperts.expert_outputs' contract)."""
    check_triton_device(x, module.up_weight)
    out = torch.empty(expert_ids.numel(), module.in_features, dtype=torch.float32,
                      device=x.device)
    if expert_ids.numel() == 0:
        return out
    return _launch_pair(module, x, token_ids.to(torch.int32), expert_ids, weights.float(), out,
                        combine_top_k=1)
