"""The first two steps of the Mamba2 chunked (SSD) scan over a varlen batch: per chunk, the
time steps and the cumulative decay (chunk cumsum), then each chunk's own contribution to the
state at its end (chunk state).

Shapes: T packed tokens, NC chunks of L = chunk_size positions, h heads, p head dim,
g groups (head i reads group i // (h / g)), n state size.

    dt_out[c, i, l]  = clamp(softplus(dt[t, i] + dt_bias[i]))      t = chunk_start[c] + l
    da_cs[c, i, l]   = sum_{l' <= l} A[i] * dt_out[c, i, l']        (0 past the chunk's end)
    states[c, i]     = sum_l exp(da_cs[c, i, L-1] - da_cs[c, i, l]) * dt_out[c, i, l]
                             * x[t, i, :]^T B[t, g(i), :]            -> [p, n] fp32

Positions past a chunk's length (the last chunk of a sequence) have dt = 0: no input and no
decay, as the model's zero padding gives. The products take x and B in their own dtype on
tensor cores (B scaled by the decay in fp32, then rounded back), fp32 inputs exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.kernels.mamba_common import MambaChunks, check_dt_limit, time_step, time_step_ref
from baton.kernels.triton_common import (
    INTERPRET,
    check_shape,
    check_triton_device,
    dot_in_f32,
    f32_precision,
    pow2,
)


@triton.jit
def _chunk_cumsum_kernel(
    # pointers
    dt_ptr, dt_bias_ptr, a_ptr, chunk_start_ptr, chunk_len_ptr, dt_out_ptr, da_cs_ptr,
    # sizes
    heads, chunk_size, dt_low, dt_high,
    # strides
    stride_dt_t, stride_dt_h, stride_out_c, stride_out_h,
    # meta-parameters
    BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    chunk = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_l = tl.arange(0, BLOCK_L)
    start = tl.load(chunk_start_ptr + chunk).to(tl.int64)
    length = tl.load(chunk_len_ptr + chunk)
    h_mask = offs_h < heads
    mask = (offs_l < length)[:, None] & h_mask[None, :]
    dt = tl.load(dt_ptr + (start + offs_l)[:, None] * stride_dt_t + offs_h[None, :] * stride_dt_h,
                 mask=mask, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_H,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(dt_bias_ptr + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    dt = tl.where(mask, time_step(dt, bias[None, :], dt_low, dt_high), 0.0)
    a = tl.load(a_ptr + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    da_cs = tl.cumsum(dt * a[None, :], axis=0)
    out = chunk.to(tl.int64) * stride_out_c + offs_h[None, :] * stride_out_h + offs_l[:, None]
    store_mask = (offs_l < chunk_size)[:, None] & h_mask[None, :]
    tl.store(dt_out_ptr + out, dt, mask=store_mask)
    tl.store(da_cs_ptr + out, da_cs, mask=store_mask)


@triton.jit
def _chunk_state_kernel(
    # pointers
    x_ptr, b_ptr, dt_out_ptr, da_cs_ptr, chunk_start_ptr, chunk_len_ptr, states_ptr,
    # sizes
    head_dim, dstate, heads_per_group, chunk_size,
    # strides
    stride_x_t, stride_x_h, stride_x_p, stride_b_t, stride_b_g, stride_b_n,
    stride_dt_c, stride_dt_h, stride_st_c, stride_st_h, stride_st_p, stride_st_n,
    # meta-parameters
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    DOT_F32: tl.constexpr, F32_PRECISION: tl.constexpr,
):
    chunk = tl.program_id(0)
    head = tl.program_id(1)
    blocks_n = tl.cdiv(dstate, BLOCK_N)
    offs_p = (tl.program_id(2) // blocks_n) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (tl.program_id(2) % blocks_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.load(chunk_start_ptr + chunk).to(tl.int64)
    length = tl.load(chunk_len_ptr + chunk)
    group = head // heads_per_group
    dt_base = chunk.to(tl.int64) * stride_dt_c + head * stride_dt_h
    cs_last = tl.load(da_cs_ptr + dt_base + chunk_size - 1)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for l0 in range(0, length, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        l_mask = offs_l < length
        tokens = start + offs_l
        x = tl.load(x_ptr + tokens[None, :] * stride_x_t + head * stride_x_h
                    + offs_p[:, None] * stride_x_p,
                    mask=(offs_p < head_dim)[:, None] & l_mask[None, :], other=0.0)  # [P, L]
        b = tl.load(b_ptr + tokens[:, None] * stride_b_t + group * stride_b_g
                    + offs_n[None, :] * stride_b_n,
                    mask=l_mask[:, None] & (offs_n < dstate)[None, :], other=0.0)  # [L, N]
        dt = tl.load(dt_out_ptr + dt_base + offs_l, mask=l_mask, other=0.0)
        cs = tl.load(da_cs_ptr + dt_base + offs_l, mask=l_mask, other=0.0)
        weight = tl.where(l_mask, tl.exp(cs_last - cs) * dt, 0.0)
        b_scaled = b.to(tl.float32) * weight[:, None]
        if DOT_F32:
            acc += tl.dot(x.to(tl.float32), b_scaled, input_precision=F32_PRECISION)
        else:
            acc += tl.dot(x, b_scaled.to(x.dtype))
    tl.store(states_ptr + chunk.to(tl.int64) * stride_st_c + head * stride_st_h
             + offs_p[:, None] * stride_st_p + offs_n[None, :] * stride_st_n, acc,
             mask=(offs_p < head_dim)[:, None] & (offs_n < dstate)[None, :])


# ---------------------------------------------------------------------- launchers
def _check_chunks(chunks: MambaChunks, num_tokens: int) -> None:
    if chunks.num_tokens > num_tokens:
        raise ValueError(f"chunks: cover {chunks.num_tokens} tokens, the inputs hold "
                         f"{num_tokens}")


def chunk_cumsum(dt: torch.Tensor, A: torch.Tensor, chunks: MambaChunks, *,
                 dt_bias: torch.Tensor | None = None,
                 dt_limit: tuple[float, float] = (0.0, float("inf"))
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """dt [T, h] raw time steps, A [h] (negative) -> (dt_out, da_cs), both [NC, h, L] fp32."""
    check_triton_device(dt, A)
    low, high = check_dt_limit(dt_limit)
    check_shape("dt", dt, (None, None), "[T, h]")
    heads = dt.shape[1]
    check_shape("A", A, (heads,), "[h]")
    check_shape("dt_bias", dt_bias, (heads,), "[h]")
    _check_chunks(chunks, dt.shape[0])
    L, nc = chunks.chunk_size, chunks.num_chunks
    dt_out = torch.zeros(nc, heads, L, dtype=torch.float32, device=dt.device)
    da_cs = torch.zeros_like(dt_out)
    if nc == 0:
        return dt_out, da_cs
    block_h = min(16, triton.next_power_of_2(heads))
    _chunk_cumsum_kernel[(nc, triton.cdiv(heads, block_h))](
        dt, dt_bias if dt_bias is not None else dt, A, chunks.chunk_start, chunks.chunk_len,
        dt_out, da_cs,
        heads, L, low, high,
        dt.stride(0), dt.stride(1), dt_out.stride(0), dt_out.stride(1),
        BLOCK_L=triton.next_power_of_2(L), BLOCK_H=block_h, HAS_BIAS=dt_bias is not None,
    )
    return dt_out, da_cs


def chunk_state(x: torch.Tensor, B: torch.Tensor, dt_out: torch.Tensor, da_cs: torch.Tensor,
                chunks: MambaChunks) -> torch.Tensor:
    """x [T, h, p], B [T, g, n], dt_out / da_cs [NC, h, L] -> states [NC, h, p, n] fp32."""
    check_triton_device(x, B, dt_out, da_cs)
    check_shape("x", x, (None, None, None), "[T, h, p]")
    t, heads, head_dim = x.shape
    check_shape("B", B, (t, None, None), "[T, g, n]")
    groups, dstate = B.shape[1], B.shape[2]
    if heads % groups:
        raise ValueError(f"B: {groups} groups do not divide {heads} heads")
    if B.dtype != x.dtype:
        raise ValueError(f"B: dtype {B.dtype} differs from x's {x.dtype}")
    nc, L = chunks.num_chunks, chunks.chunk_size
    for name, tensor in (("dt_out", dt_out), ("da_cs", da_cs)):
        check_shape(name, tensor, (nc, heads, L), "[NC, h, L]")
        if tensor.dtype != torch.float32 or not tensor.is_contiguous():
            raise ValueError(f"{name}: must be contiguous fp32 (chunk_cumsum's output)")
    _check_chunks(chunks, t)
    states = torch.empty(nc, heads, head_dim, dstate, dtype=torch.float32, device=x.device)
    if nc == 0:
        return states
    cfg = _state_config(head_dim, dstate, L, x.device)
    grid = (nc, heads, triton.cdiv(head_dim, cfg["BLOCK_P"]) * triton.cdiv(dstate, cfg["BLOCK_N"]))
    _chunk_state_kernel[grid](
        x, B, dt_out, da_cs, chunks.chunk_start, chunks.chunk_len, states,
        head_dim, dstate, heads // groups, L,
        x.stride(0), x.stride(1), x.stride(2), B.stride(0), B.stride(1), B.stride(2),
        dt_out.stride(0), dt_out.stride(1), *states.stride(),
        DOT_F32=dot_in_f32(x.dtype, INTERPRET), F32_PRECISION=f32_precision(x.device), **cfg,
    )
    return states


def _state_config(head_dim: int, dstate: int, chunk_size: int, device: torch.device) -> dict:
    if device.type != "cuda":  # the interpreter: one block per (chunk, head)
        return {"BLOCK_P": pow2(head_dim), "BLOCK_N": pow2(dstate),
                "BLOCK_L": pow2(chunk_size), "num_warps": 4}
    return {"BLOCK_P": min(64, pow2(head_dim)), "BLOCK_N": min(64, pow2(dstate)),
            "BLOCK_L": min(64, pow2(chunk_size)), "num_warps": 4, "num_stages": 3}


# ---------------------------------------------------------------------- references
def chunk_cumsum_ref(dt: torch.Tensor, A: torch.Tensor, chunks: MambaChunks, *,
                     dt_bias: torch.Tensor | None = None,
                     dt_limit: tuple[float, float] = (0.0, float("inf"))
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    L = chunks.chunk_size
    step = time_step_ref(dt, dt_bias, dt_limit)  # [T, h]
    dt_out = torch.zeros(chunks.num_chunks, dt.shape[1], L, dtype=torch.float32,
                         device=dt.device)
    for c, (start, n) in enumerate(zip(chunks.chunk_start.tolist(), chunks.chunk_len.tolist())):
        dt_out[c, :, :n] = step[start:start + n].T
    return dt_out, torch.cumsum(dt_out * A.float()[None, :, None], dim=-1)


def chunk_state_ref(x: torch.Tensor, B: torch.Tensor, dt_out: torch.Tensor,
                    da_cs: torch.Tensor, chunks: MambaChunks) -> torch.Tensor:
    heads, groups = x.shape[1], B.shape[1]
    b = B.float().repeat_interleave(heads // groups, dim=1)  # [T, h, n]
    weight = torch.exp(da_cs[..., -1:] - da_cs) * dt_out  # [NC, h, L]
    states = torch.empty(chunks.num_chunks, heads, x.shape[2], B.shape[2], dtype=torch.float32,
                         device=x.device)
    for c, (start, n) in enumerate(zip(chunks.chunk_start.tolist(), chunks.chunk_len.tolist())):
        states[c] = torch.einsum("lhp,hl,lhn->hpn", x[start:start + n].float(),
                                 weight[c, :, :n], b[start:start + n])
    return states
