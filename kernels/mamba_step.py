"""The Mamba2 recurrence token by token, in place on the cache's state slots: the decode step
(one token per sequence) and speculative verification (1 + K tokens per sequence, the state
after each kept as a snapshot for the cache's accept()).

Shapes: T tokens, S sequences, h heads, p head dim, g groups, n state size, K draft tokens.
ssm_states [num_slots, h, p, n] and snapshots [num_slots, K + 1, h, p, n] are the cache's
per-layer tensors (ModelCache.mamba_state / spec_state), fp32 or bf16.

For each token t of sequence s (state from ssm_states[slot_ids[s]], or zeros when
has_initial_state[s] is False), in fp32:

    dt    = clamp(softplus(dt_raw[t] + dt_bias))                      [h]
    state = state * exp(dt * A)[:, None, None] + (dt * x[t])[..., None] * B[t, g(i)][:, None, :]
    y[t]  = state @ C[t, g(i)]  (+ D * x[t])                          [h, p]

then, without snapshots, the final state goes back to the slot; with snapshots, the state
after the sequence's j-th token goes to snapshots[slot, j] and the slot is not written (the
cache's accept() picks one later). The operations are the model's ssm_step, in its order.

One program per (sequence, head, block of p) holds its [p, n] block in registers across the
sequence's tokens: the state is read once and written once (or once per snapshot), in
place through the slot index, never gathered into a copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.kernels.mamba_common import check_dt_limit, check_rows, time_step, time_step_ref
from baton.kernels.triton_common import (
    INTERPRET,
    check_shape,
    check_triton_device,
    check_unit_stride,
    pow2,
    seq_rows,
    to_dtype_rn,
)


@triton.jit
def _ssm_state_update_kernel(
    # pointers
    state_ptr, x_ptr, dt_ptr, dt_bias_ptr, a_ptr, b_ptr, c_ptr, d_ptr, out_ptr,
    slot_ptr, has_init_ptr, cu_ptr, snap_ptr,
    # sizes
    head_dim, dstate, heads_per_group, dt_low, dt_high,
    # strides
    stride_s_slot, stride_s_h, stride_s_p, stride_s_n,
    stride_x_t, stride_x_h, stride_x_p, stride_dt_t, stride_dt_h,
    stride_b_t, stride_b_g, stride_b_n, stride_c_t, stride_c_g, stride_c_n,
    stride_o_t, stride_o_h, stride_o_p,
    stride_sn_slot, stride_sn_j, stride_sn_h, stride_sn_p, stride_sn_n,
    # meta-parameters
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, MAX_TOKENS: tl.constexpr,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT_FLAGS: tl.constexpr,
    VARLEN: tl.constexpr, SNAPSHOTS: tl.constexpr, INTERPRETED: tl.constexpr,
):
    state_ty: tl.constexpr = state_ptr.dtype.element_ty
    out_ty: tl.constexpr = out_ptr.dtype.element_ty
    seq = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + seq).to(tl.int64)
    first, num_tokens = seq_rows(cu_ptr, seq, MAX_TOKENS, VARLEN)
    if (slot >= 0) & (num_tokens > 0):
        offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        p_mask, n_mask = offs_p < head_dim, offs_n < dstate
        mask = p_mask[:, None] & n_mask[None, :]
        state_at = (state_ptr + slot * stride_s_slot + head * stride_s_h
                    + offs_p[:, None] * stride_s_p + offs_n[None, :] * stride_s_n)
        load_mask = mask
        if HAS_INIT_FLAGS:
            load_mask = mask & (tl.load(has_init_ptr + seq) != 0)
        state = tl.load(state_at, mask=load_mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + head).to(tl.float32)
        bias = 0.0
        if HAS_BIAS:
            bias = tl.load(dt_bias_ptr + head).to(tl.float32)
        group = head // heads_per_group
        for j in range(0, num_tokens):
            t = (first + j).to(tl.int64)
            x = tl.load(x_ptr + t * stride_x_t + head * stride_x_h + offs_p * stride_x_p,
                        mask=p_mask, other=0.0).to(tl.float32)
            dt = time_step(tl.load(dt_ptr + t * stride_dt_t + head * stride_dt_h).to(tl.float32),
                           bias, dt_low, dt_high)
            b = tl.load(b_ptr + t * stride_b_t + group * stride_b_g + offs_n * stride_b_n,
                        mask=n_mask, other=0.0).to(tl.float32)
            c = tl.load(c_ptr + t * stride_c_t + group * stride_c_g + offs_n * stride_c_n,
                        mask=n_mask, other=0.0).to(tl.float32)
            state = state * tl.exp(dt * a) + (dt * x)[:, None] * b[None, :]
            y = tl.sum(state * c[None, :], axis=1)
            if HAS_D:
                y += tl.load(d_ptr + head).to(tl.float32) * x
            tl.store(out_ptr + t * stride_o_t + head * stride_o_h + offs_p * stride_o_p,
                     to_dtype_rn(y, out_ty, INTERPRETED), mask=p_mask)
            if SNAPSHOTS:
                tl.store(snap_ptr + slot * stride_sn_slot + j * stride_sn_j + head * stride_sn_h
                         + offs_p[:, None] * stride_sn_p + offs_n[None, :] * stride_sn_n,
                         to_dtype_rn(state, state_ty, INTERPRETED), mask=mask)
        if not SNAPSHOTS:
            tl.store(state_at, to_dtype_rn(state, state_ty, INTERPRETED), mask=mask)


def ssm_state_update(ssm_states: torch.Tensor, x: torch.Tensor, dt: torch.Tensor,
                     A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                     slot_ids: torch.Tensor, *, D: torch.Tensor | None = None,
                     dt_bias: torch.Tensor | None = None,
                     dt_limit: tuple[float, float] = (0.0, float("inf")),
                     has_initial_state: torch.Tensor | None = None,
                     cu_seqlens: torch.Tensor | None = None, max_tokens: int = 1,
                     snapshots: torch.Tensor | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Steps the recurrence through each sequence's tokens, in place on the slots.

    ssm_states [num_slots, h, p, n]; x [T, h, p]; dt [T, h] raw (before dt_bias and
    softplus); A [h] (negative, -exp(A_log)); B, C [T, g, n]; slot_ids [S] (-1: row left
    alone); D, dt_bias [h]; has_initial_state [S] bool (False: start from zeros).
    cu_seqlens [S + 1] int32 packs up to max_tokens tokens per sequence (None: one token
    per sequence, S = T). snapshots [num_slots, >= max_tokens, h, p, n]: keep the state after
    each token there instead of writing the slot (verification).
    Returns y [T, h, p] (fp32 unless `out` is given), D skip included when D is given.
    The launch reads nothing back to the host: it can be captured in a CUDA graph.
    """
    check_triton_device(ssm_states, x, dt, A, B, C, slot_ids)
    low, high = check_dt_limit(dt_limit)
    check_shape("x", x, (None, None, None), "[T, h, p]")
    t, heads, head_dim = x.shape
    check_shape("ssm_states", ssm_states, (None, heads, head_dim, None), "[slots, h, p, n]")
    dstate = ssm_states.shape[3]
    check_shape("dt", dt, (t, heads), "[T, h]")
    check_shape("A", A, (heads,), "[h]")
    check_shape("B", B, (t, None, dstate), "[T, g, n]")
    groups = B.shape[1]
    check_shape("C", C, (t, groups, dstate), "[T, g, n]")
    if heads % groups:
        raise ValueError(f"B: {groups} groups do not divide {heads} heads")
    check_shape("D", D, (heads,), "[h]")
    check_shape("dt_bias", dt_bias, (heads,), "[h]")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens: must be an integer >= 1, got {max_tokens!r}")
    num_seqs = t if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if cu_seqlens is None and max_tokens != 1:
        raise ValueError("max_tokens: more than one token per sequence needs cu_seqlens")
    check_rows(slot_ids, has_initial_state, cu_seqlens, num_seqs)
    if snapshots is not None:
        check_shape("snapshots", snapshots, (ssm_states.shape[0], None, heads, head_dim, dstate),
                    "[slots, K+1, h, p, n]")
        if snapshots.shape[1] < max_tokens:
            raise ValueError(f"snapshots: hold {snapshots.shape[1]} states per slot, "
                             f"max_tokens={max_tokens} needs that many")
        if snapshots.dtype != ssm_states.dtype:
            raise ValueError(f"snapshots: dtype {snapshots.dtype} differs from ssm_states' "
                             f"{ssm_states.dtype}")
    for name, tensor in (("ssm_states", ssm_states), ("x", x), ("B", B), ("C", C)):
        check_unit_stride(name, tensor)
    if out is None:
        out = torch.empty(t, heads, head_dim, dtype=torch.float32, device=x.device)
    check_shape("out", out, (t, heads, head_dim), "[T, h, p]")
    if num_seqs == 0:
        return out
    block_n = pow2(dstate)
    # Small p blocks give a decode step of one sequence enough programs to stream its state.
    block_p = pow2(head_dim, low=4) if not x.is_cuda else min(16, pow2(head_dim, low=4))
    snap = snapshots if snapshots is not None else ssm_states
    snap_strides = snapshots.stride() if snapshots is not None else (0,) * 5
    _ssm_state_update_kernel[(num_seqs, heads, triton.cdiv(head_dim, block_p))](
        ssm_states, x, dt, dt_bias if dt_bias is not None else A, A, B, C,
        D if D is not None else A, out, slot_ids,
        has_initial_state if has_initial_state is not None else slot_ids,
        cu_seqlens if cu_seqlens is not None else slot_ids, snap,
        head_dim, dstate, heads // groups, low, high,
        *ssm_states.stride(), *x.stride(), *dt.stride(), *B.stride(), *C.stride(),
        *out.stride(), *snap_strides,
        BLOCK_P=block_p, BLOCK_N=block_n, MAX_TOKENS=max_tokens, HAS_D=D is not None,
        HAS_BIAS=dt_bias is not None, HAS_INIT_FLAGS=has_initial_state is not None,
        VARLEN=cu_seqlens is not None, SNAPSHOTS=snapshots is not None,
        INTERPRETED=INTERPRET, num_warps=4,
    )
    return out


def ssm_recurrence_ref(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor,
                       A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
                       ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One sequence, token by token, fp32: state [h, p, n], x [n_t, h, p], dt [n_t, h]
    (after the time step), B and C [n_t, g, n]. Returns y [n_t, h, p] (no D skip) and the
    state after each token."""
    heads, groups = x.shape[1], B.shape[1]
    b = B.float().repeat_interleave(heads // groups, dim=1)  # [n_t, h, n]
    c = C.float().repeat_interleave(heads // groups, dim=1)
    state = state.float()
    ys, states = [], []
    for j in range(x.shape[0]):
        decay = torch.exp(dt[j] * A.float())[:, None, None]
        state = state * decay + (dt[j][:, None] * x[j].float())[..., None] * b[j][:, None, :]
        ys.append(torch.einsum("hpn,hn->hp", state, c[j]))
        states.append(state)
    empty = x.new_zeros(0, *x.shape[1:], dtype=torch.float32)
    return (torch.stack(ys) if ys else empty), states


def ssm_state_update_ref(ssm_states: torch.Tensor, x: torch.Tensor, dt: torch.Tensor,
                         A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                         slot_ids: torch.Tensor, *, D: torch.Tensor | None = None,
                         dt_bias: torch.Tensor | None = None,
                         dt_limit: tuple[float, float] = (0.0, float("inf")),
                         has_initial_state: torch.Tensor | None = None,
                         cu_seqlens: torch.Tensor | None = None, max_tokens: int = 1,
                         snapshots: torch.Tensor | None = None,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    cu = (list(range(x.shape[0] + 1)) if cu_seqlens is None else cu_seqlens.tolist())
    flags = None if has_initial_state is None else has_initial_state.tolist()
    step = time_step_ref(dt, dt_bias, dt_limit)
    for s, slot in enumerate(slot_ids.tolist()):
        first = cu[s]
        end = first + min(cu[s + 1] - first, max_tokens)
        if slot < 0 or end == first:
            continue
        state = ssm_states[slot]
        if flags is not None and not flags[s]:
            state = torch.zeros_like(state)
        rows = slice(first, end)
        y, states = ssm_recurrence_ref(state, x[rows], step[rows], A, B[rows], C[rows])
        if D is not None:
            y = y + D.float()[:, None] * x[rows].float()
        out[rows] = y.to(out.dtype)
        if snapshots is None:
            ssm_states[slot] = states[-1].to(ssm_states.dtype)
        else:
            for j, st in enumerate(states):
                snapshots[slot, j] = st.to(snapshots.dtype)
    return out
