"""Mamba2's depthwise causal conv1d (+ SiLU) over a varlen prefill batch, continuing each
sequence from its slot's conv state and writing the new conv state back.

Shapes: T packed tokens, S sequences, W conv channels (conv_dim), k taps (conv_kernel).
conv_states [num_slots, W, k - 1] is the cache's per-layer conv state: the last k - 1 conv
inputs of the sequence (ModelCache.mamba_state), in the model dtype.

A sequence's window is [conv state (k - 1 columns, zeros when fresh), its new inputs]; the
output at its token q (0-based) is

    out[t] = silu(bias + sum_i weight[:, i] * window[:, q + i])        in fp32, rounded once

and the new conv state is the window's last k - 1 columns. Two launches: the outputs (one
program per (chunk, block of W), the chunks of MambaChunks), then the states (one program
per (sequence, block of W)), so no program reads a state another has already replaced.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.kernels.mamba_common import MambaChunks, check_rows
from baton.kernels.triton_common import (
    INTERPRET,
    check_shape,
    check_triton_device,
    check_unit_stride,
    to_dtype_rn,
)


@triton.jit
def window_column(x_ptr, state_ptr, col, first, state_base, offs_w, w_mask, has_init,
                  stride_x_t, stride_s_w, TAPS: tl.constexpr):
    """Column `col` (any shape broadcasting with offs_w) of a sequence's conv window: conv
    state column col for col < TAPS (0 unless has_init), else input row first + col - TAPS."""
    from_state = col < TAPS
    old = tl.load(state_ptr + state_base + offs_w * stride_s_w + col,
                  mask=w_mask & from_state & has_init, other=0.0)
    new = tl.load(x_ptr + (first + col - TAPS).to(tl.int64) * stride_x_t + offs_w,
                  mask=w_mask & (col >= TAPS), other=0.0)
    return tl.where(from_state, old, new)


@triton.jit
def silu_f32(x):
    return x / (1.0 + tl.exp(-x))


@triton.jit
def _causal_conv1d_kernel(
    # pointers
    x_ptr, state_ptr, weight_ptr, bias_ptr, out_ptr, slot_ptr, has_init_ptr, cu_ptr,
    chunk_seq_ptr, chunk_start_ptr, chunk_len_ptr,
    # sizes
    width,
    # strides
    stride_x_t, stride_s_slot, stride_s_w, stride_w_w, stride_o_t,
    # meta-parameters
    KERNEL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_INIT_FLAGS: tl.constexpr, SILU: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    out_ty: tl.constexpr = out_ptr.dtype.element_ty
    chunk = tl.program_id(0)
    seq = tl.load(chunk_seq_ptr + chunk)
    slot = tl.load(slot_ptr + seq).to(tl.int64)
    if slot >= 0:
        offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        w_mask = offs_w < width
        first = tl.load(cu_ptr + seq)
        start = tl.load(chunk_start_ptr + chunk)
        length = tl.load(chunk_len_ptr + chunk)
        has_init = slot >= 0
        if HAS_INIT_FLAGS:
            has_init = tl.load(has_init_ptr + seq) != 0
        bias = tl.zeros((BLOCK_W,), dtype=tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_w, mask=w_mask, other=0.0).to(tl.float32)
        for t0 in range(0, length, BLOCK_T):
            offs_t = start + t0 + tl.arange(0, BLOCK_T)
            t_mask = t0 + tl.arange(0, BLOCK_T) < length
            acc = tl.zeros((BLOCK_T, BLOCK_W), dtype=tl.float32) + bias[None, :]
            for i in tl.static_range(KERNEL):
                col = (offs_t - first + i)[:, None]
                value = window_column(x_ptr, state_ptr, col, first, slot * stride_s_slot,
                                      offs_w[None, :], w_mask[None, :] & t_mask[:, None],
                                      has_init, stride_x_t, stride_s_w, KERNEL - 1)
                tap = tl.load(weight_ptr + offs_w * stride_w_w + i, mask=w_mask, other=0.0)
                acc += tap.to(tl.float32)[None, :] * value.to(tl.float32)
            if SILU:
                acc = silu_f32(acc)
            tl.store(out_ptr + offs_t.to(tl.int64)[:, None] * stride_o_t + offs_w[None, :],
                     to_dtype_rn(acc, out_ty, INTERPRETED),
                     mask=t_mask[:, None] & w_mask[None, :])


@triton.jit
def _conv_state_kernel(
    # pointers
    x_ptr, state_ptr, slot_ptr, has_init_ptr, cu_ptr,
    # sizes
    width,
    # strides
    stride_x_t, stride_s_slot, stride_s_w,
    # meta-parameters
    TAPS: tl.constexpr, BLOCK_TAPS: tl.constexpr, BLOCK_W: tl.constexpr,
    HAS_INIT_FLAGS: tl.constexpr,
):
    seq = tl.program_id(0)
    slot = tl.load(slot_ptr + seq).to(tl.int64)
    first = tl.load(cu_ptr + seq)
    length = tl.load(cu_ptr + seq + 1) - first
    if (slot >= 0) & (length > 0):
        offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        w_mask = offs_w < width
        has_init = slot >= 0
        if HAS_INIT_FLAGS:
            has_init = tl.load(has_init_ptr + seq) != 0
        taps = tl.arange(0, BLOCK_TAPS)
        mask = w_mask[:, None] & (taps < TAPS)[None, :]
        # The whole new state is loaded before any of it is stored (it may read the old).
        new = window_column(x_ptr, state_ptr, length + taps[None, :], first,
                            slot * stride_s_slot, offs_w[:, None], mask, has_init,
                            stride_x_t, stride_s_w, TAPS)
        tl.store(state_ptr + slot * stride_s_slot + offs_w[:, None] * stride_s_w
                 + taps[None, :], new, mask=mask)


def check_conv_args(x: torch.Tensor, conv_states: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, W], conv_states [slots, W, k-1], weight [W, k] (or conv1d's [W, 1, k]); returns
    the weight as [W, k]."""
    check_shape("x", x, (None, None), "[T, W]")
    width = x.shape[1]
    if weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight[:, 0]
    check_shape("weight", weight, (width, None), "[W, k]")
    kernel = weight.shape[1]
    if kernel < 2:
        raise ValueError(f"weight: a causal conv needs k >= 2 taps, got {kernel}")
    check_shape("conv_states", conv_states, (None, width, kernel - 1), "[slots, W, k-1]")
    check_shape("bias", bias, (width,), "[W]")
    for name, tensor in (("x", x), ("weight", weight), ("conv_states", conv_states)):
        check_unit_stride(name, tensor)
    if conv_states.dtype != x.dtype:
        raise ValueError(f"conv_states: dtype {conv_states.dtype} differs from x's {x.dtype}")
    return weight


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  chunks: MambaChunks, conv_states: torch.Tensor, slot_ids: torch.Tensor, *,
                  has_initial_state: torch.Tensor | None = None, silu: bool = True,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, W] packed conv inputs (a strided view of the projection is fine), weight [W, k]
    or [W, 1, k], bias [W], chunks (MambaChunks of the batch), conv_states [slots, W, k-1]
    (x's dtype), slot_ids [S] (-1: skipped, untouched), has_initial_state [S] bool.
    Returns silu(conv) [T, W] in x's dtype; conv_states[slot] becomes the last k-1 inputs."""
    check_triton_device(x, weight, conv_states, slot_ids)
    weight = check_conv_args(x, conv_states, weight, bias)
    check_rows(slot_ids, has_initial_state, chunks.cu_seqlens, chunks.num_seqs)
    t, width = x.shape
    if chunks.num_tokens > t:
        raise ValueError(f"chunks: cover {chunks.num_tokens} tokens, x holds {t}")
    if out is None:
        out = torch.empty(t, width, dtype=x.dtype, device=x.device)
    check_shape("out", out, (t, width), "[T, W]")
    check_unit_stride("out", out)
    if chunks.num_chunks == 0:
        return out
    kernel = weight.shape[1]
    flags = has_initial_state if has_initial_state is not None else slot_ids
    if x.is_cuda:
        block_t, block_w = min(16, triton.next_power_of_2(chunks.chunk_size)), 64
    else:  # the interpreter: one block per chunk
        block_t, block_w = triton.next_power_of_2(chunks.chunk_size), \
            triton.next_power_of_2(width)
    _causal_conv1d_kernel[(chunks.num_chunks, triton.cdiv(width, block_w))](
        x, conv_states, weight, bias if bias is not None else weight, out, slot_ids, flags,
        chunks.cu_seqlens, chunks.chunk_seq, chunks.chunk_start, chunks.chunk_len,
        width, x.stride(0), conv_states.stride(0), conv_states.stride(1), weight.stride(0),
        out.stride(0),
        KERNEL=kernel, BLOCK_T=block_t, BLOCK_W=block_w, HAS_BIAS=bias is not None,
        HAS_INIT_FLAGS=has_initial_state is not None, SILU=silu, INTERPRETED=INTERPRET,
        num_warps=4,
    )
    block_w = 256 if x.is_cuda else triton.next_power_of_2(width)
    _conv_state_kernel[(chunks.num_seqs, triton.cdiv(width, block_w))](
        x, conv_states, slot_ids, flags, chunks.cu_seqlens,
        width, x.stride(0), conv_states.stride(0), conv_states.stride(1),
        TAPS=kernel - 1, BLOCK_TAPS=triton.next_power_of_2(kernel - 1), BLOCK_W=block_w,
        HAS_INIT_FLAGS=has_initial_state is not None, num_warps=4,
    )
    return out


def conv_window_ref(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None, silu: bool) -> torch.Tensor:
    """One sequence: x [n, W] new inputs, conv_state [W, k-1] -> out [n, W] fp32."""
    window = torch.cat([conv_state.float(), x.float().T], dim=1)  # [W, k-1+n]
    weight = weight.reshape(weight.shape[0], -1).float()
    out = torch.nn.functional.conv1d(window[None], weight[:, None, :],
                                     None if bias is None else bias.float(),
                                     groups=weight.shape[0])[0].T
    return torch.nn.functional.silu(out) if silu else out


def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      chunks: MambaChunks, conv_states: torch.Tensor, slot_ids: torch.Tensor, *,
                      has_initial_state: torch.Tensor | None = None, silu: bool = True,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    cu = chunks.cu_seqlens.tolist()
    flags = None if has_initial_state is None else has_initial_state.tolist()
    taps = conv_states.shape[2]
    for s, slot in enumerate(slot_ids.tolist()):
        if slot < 0 or cu[s + 1] == cu[s]:
            continue
        state = conv_states[slot]
        if flags is not None and not flags[s]:
            state = torch.zeros_like(state)
        new = x[cu[s]:cu[s + 1]]
        out[cu[s]:cu[s + 1]] = conv_window_ref(new, state, weight, bias, silu).to(out.dtype)
        conv_states[slot] = torch.cat([state, new.T], dim=1)[:, -taps:]
    return out
