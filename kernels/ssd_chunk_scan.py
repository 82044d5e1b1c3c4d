"""The last step of the Mamba2 chunked scan: each chunk's outputs from its start state and a
causal, decay-weighted product of C over B within the chunk (the "attention" of SSD).

Shapes: T packed tokens, NC chunks of L positions, h heads, p head dim, g groups, n state.

    y[t] = exp(da_cs[c, l]) * C[t] . start[c]
           + sum_{l' <= l} (C[t] . B[t']) * exp(da_cs[c, l] - da_cs[c, l']) * dt_out[c, l'] * x[t']
           + D * x[t]                                    (t = chunk_start[c] + l, t' likewise)

start[c] [h, p, n] is state_passing's output. One program per (chunk, head, block of l,
block of p): C . start over the whole state width in one product, then the blocks of l' up
to the diagonal. Products as in chunk_state (16-bit operands as they are, fp32 exactly).
Chunks of a sequence whose slot is -1 write nothing.
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
    dot_in_f32,
    f32_precision,
    pow2,
    to_dtype_rn,
)


@triton.jit
def _chunk_scan_kernel(
    # pointers
    x_ptr, c_ptr, b_ptr, dt_out_ptr, da_cs_ptr, states_ptr, d_ptr, out_ptr,
    chunk_seq_ptr, chunk_start_ptr, chunk_len_ptr, slot_ptr,
    # sizes
    head_dim, dstate, heads_per_group,
    # strides
    stride_x_t, stride_x_h, stride_x_p, stride_c_t, stride_c_g, stride_c_n,
    stride_b_t, stride_b_g, stride_b_n, stride_dt_c, stride_dt_h,
    stride_st_c, stride_st_h, stride_st_p, stride_st_n, stride_o_t, stride_o_h, stride_o_p,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, HAS_D: tl.constexpr, DOT_F32: tl.constexpr,
    F32_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
):
    out_ty: tl.constexpr = out_ptr.dtype.element_ty
    chunk = tl.program_id(0)
    head = tl.program_id(1)
    blocks_p = tl.cdiv(head_dim, BLOCK_P)
    m_block = tl.program_id(2) // blocks_p
    offs_p = (tl.program_id(2) % blocks_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    seq = tl.load(chunk_seq_ptr + chunk)
    slot = tl.load(slot_ptr + seq)
    length = tl.load(chunk_len_ptr + chunk)
    if (slot >= 0) & (m_block * BLOCK_M < length):
        start = tl.load(chunk_start_ptr + chunk).to(tl.int64)
        group = head // heads_per_group
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask, p_mask = offs_m < length, offs_p < head_dim
        dt_base = chunk.to(tl.int64) * stride_dt_c + head * stride_dt_h
        cs_m = tl.load(da_cs_ptr + dt_base + offs_m, mask=m_mask, other=0.0)
        c_rows = c_ptr + (start + offs_m)[:, None] * stride_c_t + group * stride_c_g
        st_at = (states_ptr + chunk.to(tl.int64) * stride_st_c + head * stride_st_h
                 + offs_p[None, :] * stride_st_p)
        acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
        # The state width in BLOCK_N pieces (one piece when it fits the registers).
        for n0 in range(0, dstate, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < dstate
            c = tl.load(c_rows + offs_n[None, :] * stride_c_n,
                        mask=m_mask[:, None] & n_mask[None, :], other=0.0)  # [M, N]
            st = tl.load(st_at + offs_n[:, None] * stride_st_n,
                         mask=n_mask[:, None] & p_mask[None, :], other=0.0)  # [N, P] fp32
            if DOT_F32:
                acc += tl.dot(c.to(tl.float32), st, input_precision=F32_PRECISION)
            else:
                acc += tl.dot(c, st.to(c.dtype))
        acc = acc * tl.exp(cs_m)[:, None]
        end = tl.minimum((m_block + 1) * BLOCK_M, length)
        for k0 in range(0, end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < length
            cb = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for n0 in range(0, dstate, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                n_mask = offs_n < dstate
                c = tl.load(c_rows + offs_n[None, :] * stride_c_n,
                            mask=m_mask[:, None] & n_mask[None, :], other=0.0)  # [M, N]
                bt = tl.load(b_ptr + (start + offs_k)[None, :] * stride_b_t
                             + group * stride_b_g + offs_n[:, None] * stride_b_n,
                             mask=n_mask[:, None] & k_mask[None, :], other=0.0)  # [N, K]
                if DOT_F32:
                    cb += tl.dot(c.to(tl.float32), bt.to(tl.float32),
                                 input_precision=F32_PRECISION)
                else:
                    cb += tl.dot(c, bt)
            xk = tl.load(x_ptr + (start + offs_k)[:, None] * stride_x_t + head * stride_x_h
                         + offs_p[None, :] * stride_x_p,
                         mask=k_mask[:, None] & p_mask[None, :], other=0.0)  # [K, P]
            cs_k = tl.load(da_cs_ptr + dt_base + offs_k, mask=k_mask, other=0.0)
            dt_k = tl.load(dt_out_ptr + dt_base + offs_k, mask=k_mask, other=0.0)
            keep = (offs_k[None, :] <= offs_m[:, None]) & k_mask[None, :]
            # Decay exponents are <= 0 on and below the diagonal (da is never positive).
            decay = tl.exp(tl.minimum(cs_m[:, None] - cs_k[None, :], 0.0))
            cb = tl.where(keep, cb * decay * dt_k[None, :], 0.0)
            if DOT_F32:
                acc += tl.dot(cb, xk.to(tl.float32), input_precision=F32_PRECISION)
            else:
                acc += tl.dot(cb.to(xk.dtype), xk)
        if HAS_D:
            xm = tl.load(x_ptr + (start + offs_m)[:, None] * stride_x_t + head * stride_x_h
                         + offs_p[None, :] * stride_x_p,
                         mask=m_mask[:, None] & p_mask[None, :], other=0.0)
            acc += tl.load(d_ptr + head).to(tl.float32) * xm.to(tl.float32)
        tl.store(out_ptr + (start + offs_m)[:, None] * stride_o_t + head * stride_o_h
                 + offs_p[None, :] * stride_o_p, to_dtype_rn(acc, out_ty, INTERPRETED),
                 mask=m_mask[:, None] & p_mask[None, :])


def chunk_scan(x: torch.Tensor, B: torch.Tensor, C: torch.Tensor, dt_out: torch.Tensor,
               da_cs: torch.Tensor, start_states: torch.Tensor, chunks: MambaChunks,
               slot_ids: torch.Tensor, *, D: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, h, p], B and C [T, g, n], dt_out / da_cs [NC, h, L], start_states [NC, h, p, n]
    fp32 -> y [T, h, p] (fp32 unless `out` says otherwise; rows of sequences whose slot is -1
    are left as they are)."""
    check_triton_device(x, B, C, dt_out, da_cs, start_states)
    check_shape("x", x, (None, None, None), "[T, h, p]")
    t, heads, head_dim = x.shape
    check_shape("B", B, (t, None, None), "[T, g, n]")
    groups, dstate = B.shape[1], B.shape[2]
    check_shape("C", C, (t, groups, dstate), "[T, g, n]")
    if heads % groups:
        raise ValueError(f"B: {groups} groups do not divide {heads} heads")
    if B.dtype != x.dtype or C.dtype != x.dtype:
        raise ValueError(f"B, C: dtypes {B.dtype}, {C.dtype} differ from x's {x.dtype}")
    nc, L = chunks.num_chunks, chunks.chunk_size
    check_shape("dt_out", dt_out, (nc, heads, L), "[NC, h, L]")
    check_shape("da_cs", da_cs, (nc, heads, L), "[NC, h, L]")
    check_shape("start_states", start_states, (nc, heads, head_dim, dstate), "[NC, h, p, n]")
    check_shape("D", D, (heads,), "[h]")
    check_rows(slot_ids, None, None, chunks.num_seqs)
    if out is None:
        out = torch.empty(t, heads, head_dim, dtype=torch.float32, device=x.device)
    check_shape("out", out, (t, heads, head_dim), "[T, h, p]")
    if nc == 0:
        return out
    cfg = _scan_config(head_dim, dstate, L, x.device, x.dtype)
    grid = (nc, heads, triton.cdiv(L, cfg["BLOCK_M"]) * triton.cdiv(head_dim, cfg["BLOCK_P"]))
    _chunk_scan_kernel[grid](
        x, C, B, dt_out, da_cs, start_states, D if D is not None else dt_out, out,
        chunks.chunk_seq, chunks.chunk_start, chunks.chunk_len, slot_ids,
        head_dim, dstate, heads // groups,
        *x.stride(), *C.stride(), *B.stride(), dt_out.stride(0), dt_out.stride(1),
        *start_states.stride(), *out.stride(),
        HAS_D=D is not None, DOT_F32=dot_in_f32(x.dtype, INTERPRET),
        F32_PRECISION=f32_precision(x.device), INTERPRETED=INTERPRET, **cfg,
    )
    return out


def _scan_config(head_dim: int, dstate: int, chunk_size: int, device: torch.device,
                 dtype: torch.dtype = torch.bfloat16) -> dict:
    if device.type != "cuda":  # the interpreter: one block per (chunk, head)
        block = pow2(chunk_size)
        return {"BLOCK_M": block, "BLOCK_K": block, "BLOCK_P": pow2(head_dim),
                "BLOCK_N": pow2(dstate), "num_warps": 4}
    if dtype == torch.float32:  # 3-pass tf32 products: narrow state pieces
        return {"BLOCK_M": 64, "BLOCK_K": 32, "BLOCK_P": min(32, pow2(head_dim)),
                "BLOCK_N": min(32, pow2(dstate)), "num_warps": 4, "num_stages": 1}
    return {"BLOCK_M": min(64, pow2(chunk_size)), "BLOCK_K": min(64, pow2(chunk_size)),
            "BLOCK_P": min(64, pow2(head_dim)), "BLOCK_N": pow2(dstate), "num_warps": 8,
            "num_stages": 2}


def chunk_scan_ref(x: torch.Tensor, B: torch.Tensor, C: torch.Tensor, dt_out: torch.Tensor,
                   da_cs: torch.Tensor, start_states: torch.Tensor, chunks: MambaChunks,
                   slot_ids: torch.Tensor, *, D: torch.Tensor | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    heads, groups = x.shape[1], B.shape[1]
    b = B.float().repeat_interleave(heads // groups, dim=1)  # [T, h, n]
    c = C.float().repeat_interleave(heads // groups, dim=1)
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    slots = slot_ids.tolist()
    for ch, (seq, start, n) in enumerate(zip(chunks.chunk_seq.tolist(),
                                             chunks.chunk_start.tolist(),
                                             chunks.chunk_len.tolist())):
        if slots[seq] < 0:
            continue
        rows = slice(start, start + n)
        cs = da_cs[ch, :, :n]  # [h, l]
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device=x.device))
        decay = torch.exp((cs[:, :, None] - cs[:, None, :]).masked_fill(~causal, -torch.inf))
        scores = torch.einsum("lhn,shn->hls", c[rows], b[rows]) * decay * dt_out[ch, :, None, :n]
        y = torch.einsum("hls,shp->lhp", scores, x[rows].float())
        y = y + torch.einsum("lhn,hpn,hl->lhp", c[rows], start_states[ch], torch.exp(cs))
        if D is not None:
            y = y + D.float()[None, :, None] * x[rows].float()
        out[rows] = y.to(out.dtype)
    return out
