"""Grouped-query attention of prompt chunks over the paged KV cache: each sequence's new
queries attend to its cached tokens and, causally, to each other, all read from the pages in
place (the chunk's own K/V written there first, as the model does).

Shapes: T packed query tokens, S sequences, Q query heads, KV key/value heads, D head dim;
k_pages and v_pages [num_pages, page_size, KV, D], block_tables [S, max_pages] int32,
context_lens [S] int32 (cached + new tokens), cu_seqlens [S + 1] int32.

Query j of sequence s sits at position context_lens[s] - n_s + j and sees keys 0 .. that
position (paged_attention's rule; a fresh prompt is plainly causal). Flash-attention form:
one program per (sequence, block of queries, query head) runs an online softmax over the key
blocks up to its last query's position.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.kernels.attention_decode import LOG2E, attend_rows, check_paged_args, paged_attention_ref
from baton.kernels.triton_common import (
    INTERPRET,
    check_shape,
    check_triton_device,
    check_unit_stride,
    dot_in_f32,
    f32_precision,
    pow2,
    to_dtype_rn,
)


@triton.jit
def _prefill_attention_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, table_ptr, ctx_ptr, cu_ptr, out_ptr,
    # sizes
    head_dim, page_size, qk_scale,
    # strides
    stride_q_t, stride_q_h, stride_k_page, stride_k_tok, stride_k_h,
    stride_v_page, stride_v_tok, stride_v_h, stride_table_s, stride_o_t, stride_o_h,
    # meta-parameters
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, F32_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    out_ty: tl.constexpr = out_ptr.dtype.element_ty
    seq = tl.program_id(0)
    m_block = tl.program_id(1)
    head = tl.program_id(2)
    ctx = tl.load(ctx_ptr + seq)
    first = tl.load(cu_ptr + seq)
    num_queries = tl.load(cu_ptr + seq + 1) - first  # all of them (no MAX as in decode)
    if (ctx > 0) & (m_block * BLOCK_M < num_queries):
        kv_head = head // GROUP
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_valid = offs_m < num_queries
        pos = ctx - num_queries + offs_m
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < head_dim
        row_t = (first + offs_m).to(tl.int64)
        mask = row_valid[:, None] & d_mask[None, :]
        # Keys past the block's last query are masked for every row: not read at all.
        end = tl.minimum(ctx, ctx - num_queries + (m_block + 1) * BLOCK_M)
        o, _, _ = attend_rows(
            q_ptr + row_t[:, None] * stride_q_t + head * stride_q_h + offs_d[None, :], mask,
            pos, k_ptr, v_ptr, table_ptr + seq.to(tl.int64) * stride_table_s, 0, end,
            page_size, kv_head, stride_k_page, stride_k_tok, stride_k_h, stride_v_page,
            stride_v_tok, stride_v_h, offs_d, d_mask, qk_scale, BLOCK_M, BLOCK_D, BLOCK_N,
            DOT_F32, F32_PRECISION)
        tl.store(out_ptr + row_t[:, None] * stride_o_t + head * stride_o_h + offs_d[None, :],
                 to_dtype_rn(o, out_ty, INTERPRETED), mask=mask)


def prefill_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                      block_tables: torch.Tensor, context_lens: torch.Tensor,
                      cu_seqlens: torch.Tensor, max_seqlen: int, *,
                      scale: float | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Prompt-chunk attention over the paged cache.

    q [T, Q, D]; k_pages, v_pages [num_pages, page_size, KV, D]; block_tables [S, max_pages]
    int32; context_lens [S] int32 (cached + new; 0: sequence untouched); cu_seqlens [S + 1]
    int32; max_seqlen (host int) >= the longest sequence's queries (it sizes the grid);
    scale (default D ** -0.5). Returns out [T, Q, D] in q's dtype."""
    check_triton_device(q, k_pages, v_pages, block_tables, context_lens, cu_seqlens)
    num_seqs = block_tables.shape[0] if block_tables.dim() == 2 else -1
    check_paged_args(q, k_pages, v_pages, block_tables, context_lens, cu_seqlens, num_seqs)
    if not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen: must be an integer >= 0, got {max_seqlen!r}")
    _, heads, head_dim = q.shape
    page_size, kv_heads = k_pages.shape[1], k_pages.shape[2]
    if out is None:
        out = torch.empty_like(q)
    check_shape("out", out, tuple(q.shape), "q's shape")
    check_unit_stride("out", out)
    if num_seqs == 0 or max_seqlen == 0:
        return out
    if q.is_cuda and q.dtype == torch.float32:  # fp32 tiles: twice the registers
        block_m, block_n, warps = 32, 32, 8
    elif q.is_cuda:
        block_m, block_n, warps = (128, 64, 8) if head_dim <= 64 else (64, 64, 4)
    else:  # the interpreter: few, large blocks
        block_m, block_n, warps = min(64, pow2(max_seqlen)), 64, 4
    _prefill_attention_kernel[(num_seqs, triton.cdiv(max_seqlen, block_m), heads)](
        q, k_pages, v_pages, block_tables, context_lens, cu_seqlens, out,
        head_dim, page_size, (head_dim ** -0.5 if scale is None else float(scale)) * LOG2E,
        q.stride(0), q.stride(1), k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        v_pages.stride(0), v_pages.stride(1), v_pages.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=heads // kv_heads, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=pow2(head_dim),
        DOT_F32=dot_in_f32(q.dtype, INTERPRET), F32_PRECISION=f32_precision(q.device),
        INTERPRETED=INTERPRET, num_warps=warps,
    )
    return out


def prefill_attention_ref(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                          block_tables: torch.Tensor, context_lens: torch.Tensor,
                          cu_seqlens: torch.Tensor, max_seqlen: int, *,
                          scale: float | None = None,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """The same rule as paged_attention's reference, every query of every sequence."""
    return paged_attention_ref(q, k_pages, v_pages, block_tables, context_lens,
                               cu_seqlens=cu_seqlens, max_queries=None, scale=scale, out=out)
