"""Mamba2's causal conv1d (+ SiLU) for a few new tokens per sequence, in place on the slots:
the decode step (one token) and speculative verification (1 + K tokens, the whole window kept
for the cache's accept()).

Shapes: T tokens, S sequences, W conv channels, k taps, K draft tokens. conv_states
[num_slots, W, k - 1] and conv_windows [num_slots, W, k - 1 + K + 1] are the cache's
per-layer tensors (ModelCache.mamba_state / spec_state), in the model dtype.

The window of sequence s is [conv_states[slot] (zeros when fresh), its n new inputs]; token
j's output is silu(bias + sum_i weight[:, i] * window[:, j + i]) (fp32, rounded once).
Without conv_windows the slot keeps the window's last k - 1 columns (decode); with them the
window's k - 1 + n columns go to conv_windows[slot] and the slot's state is not written (the
model's verification: accept() later takes the columns after the accepted token).
One program per (sequence, block of W); a row whose slot is -1 does nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.kernels.mamba_common import check_rows
from baton.kernels.mamba_conv import check_conv_args, conv_window_ref, silu_f32, window_column
from baton.kernels.triton_common import (
    INTERPRET,
    check_shape,
    check_triton_device,
    check_unit_stride,
    seq_rows,
    to_dtype_rn,
)


@triton.jit
def _causal_conv1d_update_kernel(
    # pointers
    x_ptr, state_ptr, weight_ptr, bias_ptr, out_ptr, slot_ptr, has_init_ptr, cu_ptr,
    windows_ptr,
    # sizes
    width,
    # strides
    stride_x_t, stride_s_slot, stride_s_w, stride_w_w, stride_o_t, stride_win_slot,
    stride_win_w,
    # meta-parameters
    KERNEL: tl.constexpr, MAX_TOKENS: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_COLS: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_INIT_FLAGS: tl.constexpr, VARLEN: tl.constexpr, WINDOWS: tl.constexpr,
    SILU: tl.constexpr, INTERPRETED: tl.constexpr,
):
    out_ty: tl.constexpr = out_ptr.dtype.element_ty
    TAPS: tl.constexpr = KERNEL - 1
    seq = tl.program_id(0)
    slot = tl.load(slot_ptr + seq).to(tl.int64)
    first, num_tokens = seq_rows(cu_ptr, seq, MAX_TOKENS, VARLEN)
    if (slot >= 0) & (num_tokens > 0):
        offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        w_mask = offs_w < width
        has_init = slot >= 0
        if HAS_INIT_FLAGS:
            has_init = tl.load(has_init_ptr + seq) != 0
        state_base = slot * stride_s_slot
        taps = tl.arange(0, BLOCK_K)
        tap_mask = w_mask[:, None] & (taps < KERNEL)[None, :]
        weight = tl.load(weight_ptr + offs_w[:, None] * stride_w_w + taps[None, :],
                         mask=tap_mask, other=0.0).to(tl.float32)  # [W, k]
        bias = tl.zeros((BLOCK_W,), dtype=tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_w, mask=w_mask, other=0.0).to(tl.float32)
        for j in range(0, num_tokens):
            window = window_column(x_ptr, state_ptr, j + taps[None, :], first, state_base,
                                   offs_w[:, None], tap_mask, has_init, stride_x_t,
                                   stride_s_w, TAPS)
            acc = bias + tl.sum(weight * window.to(tl.float32), axis=1)
            if SILU:
                acc = silu_f32(acc)
            tl.store(out_ptr + (first + j).to(tl.int64) * stride_o_t + offs_w,
                     to_dtype_rn(acc, out_ty, INTERPRETED), mask=w_mask)
        if WINDOWS:
            cols = tl.arange(0, BLOCK_COLS)
            mask = w_mask[:, None] & (cols < TAPS + num_tokens)[None, :]
            window = window_column(x_ptr, state_ptr, cols[None, :], first, state_base,
                                   offs_w[:, None], mask, has_init, stride_x_t, stride_s_w,
                                   TAPS)
            tl.store(windows_ptr + slot * stride_win_slot + offs_w[:, None] * stride_win_w
                     + cols[None, :], window, mask=mask)
        else:
            cols = tl.arange(0, BLOCK_K)
            mask = w_mask[:, None] & (cols < TAPS)[None, :]
            # Loaded whole before it is stored: the new state reads the old one.
            new = window_column(x_ptr, state_ptr, num_tokens + cols[None, :], first,
                                state_base, offs_w[:, None], mask, has_init, stride_x_t,
                                stride_s_w, TAPS)
            tl.store(state_ptr + state_base + offs_w[:, None] * stride_s_w + cols[None, :],
                     new, mask=mask)


def causal_conv1d_update(x: torch.Tensor, conv_states: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None, slot_ids: torch.Tensor, *,
                         has_initial_state: torch.Tensor | None = None,
                         cu_seqlens: torch.Tensor | None = None, max_tokens: int = 1,
                         conv_windows: torch.Tensor | None = None, silu: bool = True,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, W] new conv inputs (strided rows fine), conv_states [slots, W, k-1], weight
    [W, k] or [W, 1, k], bias [W], slot_ids [S] (-1: row left alone), has_initial_state [S]
    bool, cu_seqlens [S + 1] int32 (None: one token per sequence, S = T), max_tokens (the
    most tokens a sequence has), conv_windows [slots, W, >= k-1+max_tokens] (verification).
    Returns silu(conv) [T, W] in x's dtype. Reads nothing back to the host (graph-safe)."""
    check_triton_device(x, conv_states, weight, slot_ids)
    weight = check_conv_args(x, conv_states, weight, bias)
    t, width = x.shape
    kernel = weight.shape[1]
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens: must be an integer >= 1, got {max_tokens!r}")
    if cu_seqlens is None and max_tokens != 1:
        raise ValueError("max_tokens: more than one token per sequence needs cu_seqlens")
    num_seqs = t if cu_seqlens is None else cu_seqlens.shape[0] - 1
    check_rows(slot_ids, has_initial_state, cu_seqlens, num_seqs)
    if conv_windows is not None:
        check_shape("conv_windows", conv_windows, (conv_states.shape[0], width, None),
                    "[slots, W, k-1+K+1]")
        if conv_windows.shape[2] < kernel - 1 + max_tokens:
            raise ValueError(f"conv_windows: {conv_windows.shape[2]} columns, max_tokens="
                             f"{max_tokens} needs {kernel - 1 + max_tokens}")
        if conv_windows.dtype != x.dtype:
            raise ValueError(f"conv_windows: dtype {conv_windows.dtype} differs from x's "
                             f"{x.dtype}")
        check_unit_stride("conv_windows", conv_windows)
    if out is None:
        out = torch.empty(t, width, dtype=x.dtype, device=x.device)
    check_shape("out", out, (t, width), "[T, W]")
    check_unit_stride("out", out)
    if num_seqs == 0:
        return out
    block_w = 256 if x.is_cuda else triton.next_power_of_2(width)
    windows = conv_windows if conv_windows is not None else conv_states
    _causal_conv1d_update_kernel[(num_seqs, triton.cdiv(width, block_w))](
        x, conv_states, weight, bias if bias is not None else weight, out, slot_ids,
        has_initial_state if has_initial_state is not None else slot_ids,
        cu_seqlens if cu_seqlens is not None else slot_ids, windows,
        width, x.stride(0), conv_states.stride(0), conv_states.stride(1), weight.stride(0),
        out.stride(0), windows.stride(0), windows.stride(1),
        KERNEL=kernel, MAX_TOKENS=max_tokens, BLOCK_W=block_w,
        BLOCK_K=triton.next_power_of_2(kernel),
        BLOCK_COLS=triton.next_power_of_2(kernel - 1 + max_tokens), HAS_BIAS=bias is not None,
        HAS_INIT_FLAGS=has_initial_state is not None, VARLEN=cu_seqlens is not None,
        WINDOWS=conv_windows is not None, SILU=silu, INTERPRETED=INTERPRET, num_warps=4,
    )
    return out


def causal_conv1d_update_ref(x: torch.Tensor, conv_states: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None, slot_ids: torch.Tensor, *,
                             has_initial_state: torch.Tensor | None = None,
                             cu_seqlens: torch.Tensor | None = None, max_tokens: int = 1,
                             conv_windows: torch.Tensor | None = None, silu: bool = True,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    cu = list(range(x.shape[0] + 1)) if cu_seqlens is None else cu_seqlens.tolist()
    flags = None if has_initial_state is None else has_initial_state.tolist()
    taps = conv_states.shape[2]
    for s, slot in enumerate(slot_ids.tolist()):
        first = cu[s]
        end = first + min(cu[s + 1] - first, max_tokens)
        if slot < 0 or end == first:
            continue
        state = conv_states[slot]
        if flags is not None and not flags[s]:
            state = torch.zeros_like(state)
        new = x[first:end]
        out[first:end] = conv_window_ref(new, state, weight, bias, silu).to(out.dtype)
        window = torch.cat([state, new.T], dim=1)  # [W, k-1+n]
        if conv_windows is None:
            conv_states[slot] = window[:, -taps:]
        else:
            conv_windows[slot, :, :window.shape[1]] = window
    return out
