"""Grouped-query attention of decode steps and speculative verification over the paged KV
cache, read in place (no gather of a sequence's pages into a padded copy), split over the
context for long sequences.

Shapes: T query tokens, S sequences, Q query heads, KV key/value heads (G = Q / KV), D head
dim. k_pages and v_pages [num_pages, page_size, KV, D] are the cache's per-layer tensors
(ModelCache.kv_pages), holding the new tokens' K/V already; block_tables [S, max_pages]
int32 page ids (-1 padding); context_lens [S] int32 tokens in the cache per sequence, new
ones included (0: a padded row, left untouched).

Query j of sequence s (n_s = cu_seqlens[s+1] - cu_seqlens[s] queries, at most max_queries)
sits at position context_lens[s] - n_s + j and sees keys 0 .. that position (causal among
the new tokens; a decode step has n_s = 1). No positional encoding; scale D ** -0.5.

Split over the context: split i covers keys [i * split_tokens, (i + 1) * split_tokens) of
every sequence. Grid (S, KV, num_splits), num_splits = ceil(max_pages * page_size /
split_tokens), all fixed by the tensors' shapes, so the launch reads nothing back to the host
(graph-safe). Each program takes the G query heads (times the sequence's queries) of one KV
head as the rows of one tile, so a K/V tile is read once for the whole group. Each split keeps
o_i = softmax-weighted V over its keys and lse_i = log2 sum exp2 of its scores; a second
launch combines the splits that hold keys of the row, in split order:
    out = sum_i 2^(lse_i - max lse) o_i / sum_i 2^(lse_i - max lse).
The split boundaries depend on split_tokens alone, never on the batch: a sequence's result has
the same bits in any batch, padded or not. With one split the first launch writes the output.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from baton.kernels.triton_common import (
    INTERPRET,
    check_shape,
    check_triton_device,
    check_unit_stride,
    dot_in_f32,
    f32_precision,
    pow2,
    seq_rows,
    to_dtype_rn,
)

LOG2E = 1.4426950408889634
DEFAULT_SPLIT_TOKENS = 256
MAX_SPLITS = 64


def split_tokens_for(max_context: int) -> int:
    """The split size an engine fixes once from its longest context (max_model_len): 256
    keys, or more where that would make over MAX_SPLITS splits (the workspace holds
    [S, splits, queries, Q, D] fp32). Fixed per engine, so results never depend on the batch."""
    if not isinstance(max_context, int) or max_context < 1:
        raise ValueError(f"max_context: must be an integer >= 1, got {max_context!r}")
    need = -(-max_context // MAX_SPLITS)
    return max(DEFAULT_SPLIT_TOKENS, 16 * -(-need // 16))


@triton.jit
def attend_rows(q_at, q_mask, pos, k_ptr, v_ptr, table_ptr, start, end, page_size, kv_head,
                stride_k_page, stride_k_tok, stride_k_h, stride_v_page, stride_v_tok,
                stride_v_h, offs_d, d_mask, qk_scale,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                DOT_F32: tl.constexpr, F32_PRECISION: tl.constexpr):
    """The query rows at q_at [M, D] (pointers) attend, by an online softmax in base 2, to one
    sequence's keys start .. end - 1 read through its page table; row r sees keys <= pos[r].
    Returns (o, m, l): o the softmax-weighted values (0 for a row that saw no key), m and l
    the running max and sum (log2 sum exp2 of the row's scores = m + log2 l)."""
    q = tl.load(q_at, mask=q_mask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), -float("inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        page = tl.load(table_ptr + offs_n // page_size, mask=n_mask, other=0).to(tl.int64)
        page = tl.maximum(page, 0)  # padding ids are never read (masked), keep them in range
        within = (offs_n % page_size).to(tl.int64)
        kt = tl.load(k_ptr + page[None, :] * stride_k_page + within[None, :] * stride_k_tok
                     + kv_head * stride_k_h + offs_d[:, None],
                     mask=d_mask[:, None] & n_mask[None, :], other=0.0)  # [D, N]
        v = tl.load(v_ptr + page[:, None] * stride_v_page + within[:, None] * stride_v_tok
                    + kv_head * stride_v_h + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # [N, D]
        if DOT_F32:
            s = tl.dot(q, kt.to(tl.float32), input_precision=F32_PRECISION)
        else:
            s = tl.dot(q, kt)
        visible = (offs_n[None, :] <= pos[:, None]) & n_mask[None, :]
        s = tl.where(visible, s * qk_scale, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=F32_PRECISION)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None], m_i, l_i


@triton.jit
def _paged_decode_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, table_ptr, ctx_ptr, cu_ptr, out_ptr, ws_out_ptr, ws_lse_ptr,
    # sizes
    head_dim, page_size, split_tokens, qk_scale,
    # strides
    stride_q_t, stride_q_h, stride_k_page, stride_k_tok, stride_k_h,
    stride_v_page, stride_v_tok, stride_v_h, stride_table_s, stride_o_t, stride_o_h,
    stride_ws_s, stride_ws_split, stride_ws_t, stride_ws_h,
    stride_lse_s, stride_lse_split, stride_lse_t,
    # meta-parameters
    GROUP: tl.constexpr, MAX_QUERIES: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
    VARLEN: tl.constexpr, DOT_F32: tl.constexpr, F32_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    out_ty: tl.constexpr = out_ptr.dtype.element_ty
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + seq)
    first, num_queries = seq_rows(cu_ptr, seq, MAX_QUERIES, VARLEN)
    start = split * split_tokens
    if (start < ctx) & (num_queries > 0):
        end = tl.minimum(start + split_tokens, ctx)
        rows = tl.arange(0, BLOCK_M)
        token = rows // GROUP
        head = kv_head * GROUP + rows % GROUP
        row_valid = token < num_queries
        pos = ctx - num_queries + token
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < head_dim
        row_t = (first + token).to(tl.int64)
        mask = row_valid[:, None] & d_mask[None, :]
        o, m_i, l_i = attend_rows(
            q_ptr + row_t[:, None] * stride_q_t + head[:, None] * stride_q_h + offs_d[None, :],
            mask, pos, k_ptr, v_ptr, table_ptr + seq.to(tl.int64) * stride_table_s, start, end,
            page_size, kv_head, stride_k_page, stride_k_tok, stride_k_h, stride_v_page,
            stride_v_tok, stride_v_h, offs_d, d_mask, qk_scale, BLOCK_M, BLOCK_D, BLOCK_N,
            DOT_F32, F32_PRECISION)
        seen = l_i > 0.0
        if SINGLE_SPLIT:
            tl.store(out_ptr + row_t[:, None] * stride_o_t + head[:, None] * stride_o_h
                     + offs_d[None, :], to_dtype_rn(o, out_ty, INTERPRETED), mask=mask)
        else:
            ws = (seq.to(tl.int64) * stride_ws_s + split * stride_ws_split
                  + token * stride_ws_t + head * stride_ws_h)
            tl.store(ws_out_ptr + ws[:, None] + offs_d[None, :], o, mask=mask)
            lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), -float("inf"))
            tl.store(ws_lse_ptr + seq.to(tl.int64) * stride_lse_s + split * stride_lse_split
                     + token * stride_lse_t + head, lse, mask=row_valid)


@triton.jit
def _combine_splits_kernel(
    # pointers
    ws_out_ptr, ws_lse_ptr, ctx_ptr, cu_ptr, out_ptr,
    # sizes
    head_dim, split_tokens,
    # strides
    stride_ws_s, stride_ws_split, stride_ws_t, stride_ws_h,
    stride_lse_s, stride_lse_split, stride_lse_t, stride_o_t, stride_o_h,
    # meta-parameters
    MAX_QUERIES: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    out_ty: tl.constexpr = out_ptr.dtype.element_ty
    seq = tl.program_id(0)
    token = tl.program_id(1)
    head = tl.program_id(2)
    ctx = tl.load(ctx_ptr + seq)
    first, num_queries = seq_rows(cu_ptr, seq, MAX_QUERIES, VARLEN)
    if (ctx > 0) & (token < num_queries):
        pos = ctx - num_queries + token
        splits = pos // split_tokens + 1  # the splits that hold keys this row sees
        lse_at = ws_lse_ptr + seq.to(tl.int64) * stride_lse_s + token * stride_lse_t + head
        top = -float("inf")
        for i in range(0, splits):
            top = tl.maximum(top, tl.load(lse_at + i * stride_lse_split))
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < head_dim
        o_at = (ws_out_ptr + seq.to(tl.int64) * stride_ws_s + token * stride_ws_t
                + head * stride_ws_h + offs_d)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        total = 0.0
        for i in range(0, splits):
            weight = tl.exp2(tl.load(lse_at + i * stride_lse_split) - top)
            acc += weight * tl.load(o_at + i * stride_ws_split, mask=d_mask, other=0.0)
            total += weight
        tl.store(out_ptr + (first + token).to(tl.int64) * stride_o_t + head * stride_o_h
                 + offs_d, to_dtype_rn(acc / total, out_ty, INTERPRETED), mask=d_mask)


def decode_block_n(q: torch.Tensor) -> int:
    """Keys per step: fp32 tiles on a GPU take twice the registers of 16-bit ones."""
    return 32 if q.is_cuda and q.dtype == torch.float32 else 64


def check_paged_args(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor,
                     cu_seqlens: torch.Tensor | None, num_seqs: int) -> None:
    check_shape("q", q, (None, None, None), "[T, Q, D]")
    _, heads, head_dim = q.shape
    check_shape("k_pages", k_pages, (None, None, None, head_dim), "[pages, page_size, KV, D]")
    check_shape("v_pages", v_pages, tuple(k_pages.shape), "k_pages' shape")
    kv_heads = k_pages.shape[2]
    if heads % kv_heads:
        raise ValueError(f"q: {heads} query heads are not a multiple of {kv_heads} KV heads")
    if k_pages.dtype != q.dtype or v_pages.dtype != q.dtype:
        raise ValueError(f"k_pages, v_pages: dtypes {k_pages.dtype}, {v_pages.dtype} differ "
                         f"from q's {q.dtype}")
    for name, tensor in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages)):
        check_unit_stride(name, tensor)
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or \
            block_tables.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_tables: expected int32 [{num_seqs}, max_pages], got "
                         f"{block_tables.dtype} {tuple(block_tables.shape)}")
    if tuple(context_lens.shape) != (num_seqs,) or context_lens.dtype != torch.int32:
        raise ValueError(f"context_lens: expected int32 [{num_seqs}], got "
                         f"{context_lens.dtype} {tuple(context_lens.shape)}")
    if cu_seqlens is not None and (tuple(cu_seqlens.shape) != (num_seqs + 1,)
                                   or cu_seqlens.dtype != torch.int32):
        raise ValueError(f"cu_seqlens: expected int32 [{num_seqs + 1}], got "
                         f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")


def paged_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor, *,
                    cu_seqlens: torch.Tensor | None = None, max_queries: int = 1,
                    scale: float | None = None, split_tokens: int = DEFAULT_SPLIT_TOKENS,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode / verify attention over the paged cache.

    q [T, Q, D]; k_pages, v_pages [num_pages, page_size, KV, D] (q's dtype); block_tables
    [S, max_pages] int32; context_lens [S] int32 (new tokens included; 0: row untouched);
    cu_seqlens [S + 1] int32 with up to max_queries queries per sequence (None: one query per
    sequence, S = T); scale (default D ** -0.5); split_tokens (keys per split, a multiple of
    16). Returns out [T, Q, D] in q's dtype (rows of padded sequences untouched)."""
    check_triton_device(q, k_pages, v_pages, block_tables, context_lens)
    num_seqs = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    check_paged_args(q, k_pages, v_pages, block_tables, context_lens, cu_seqlens, num_seqs)
    if not isinstance(max_queries, int) or max_queries < 1:
        raise ValueError(f"max_queries: must be an integer >= 1, got {max_queries!r}")
    if cu_seqlens is None and max_queries != 1:
        raise ValueError("max_queries: more than one query per sequence needs cu_seqlens")
    if not isinstance(split_tokens, int) or split_tokens < 16 or split_tokens % 16:
        raise ValueError(f"split_tokens: must be a positive multiple of 16, got {split_tokens!r}")
    t, heads, head_dim = q.shape
    page_size, kv_heads = k_pages.shape[1], k_pages.shape[2]
    group = heads // kv_heads
    if out is None:
        out = torch.empty_like(q)
    check_shape("out", out, tuple(q.shape), "q's shape")
    check_unit_stride("out", out)
    if num_seqs == 0:
        return out
    scale = head_dim ** -0.5 if scale is None else float(scale)
    num_splits = max(1, math.ceil(block_tables.shape[1] * page_size / split_tokens))
    single = num_splits == 1
    ws_out = torch.empty((num_seqs, num_splits, max_queries, heads, head_dim) if not single
                         else (1, 1, 1, 1, 1), dtype=torch.float32, device=q.device)
    ws_lse = torch.empty(ws_out.shape[:4], dtype=torch.float32, device=q.device)
    cu = cu_seqlens if cu_seqlens is not None else context_lens
    block_d = pow2(head_dim)
    block_n = min(decode_block_n(q), pow2(split_tokens))
    _paged_decode_kernel[(num_seqs, kv_heads, num_splits)](
        q, k_pages, v_pages, block_tables, context_lens, cu, out, ws_out, ws_lse,
        head_dim, page_size, split_tokens, scale * LOG2E,
        q.stride(0), q.stride(1), k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        v_pages.stride(0), v_pages.stride(1), v_pages.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), *ws_out.stride()[:4], *ws_lse.stride()[:3],
        GROUP=group, MAX_QUERIES=max_queries, BLOCK_M=pow2(group * max_queries),
        BLOCK_N=block_n, BLOCK_D=block_d, SINGLE_SPLIT=single, VARLEN=cu_seqlens is not None,
        DOT_F32=dot_in_f32(q.dtype, INTERPRET), F32_PRECISION=f32_precision(q.device),
        INTERPRETED=INTERPRET, num_warps=4,
    )
    if not single:
        _combine_splits_kernel[(num_seqs, max_queries, heads)](
            ws_out, ws_lse, context_lens, cu, out,
            head_dim, split_tokens, *ws_out.stride()[:4], *ws_lse.stride()[:3],
            out.stride(0), out.stride(1),
            MAX_QUERIES=max_queries, BLOCK_D=block_d, VARLEN=cu_seqlens is not None,
            INTERPRETED=INTERPRET, num_warps=1 if head_dim <= 64 else 2,
        )
    return out


def paged_attention_ref(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                        block_tables: torch.Tensor, context_lens: torch.Tensor, *,
                        cu_seqlens: torch.Tensor | None = None, max_queries: int | None = 1,
                        scale: float | None = None, split_tokens: int = DEFAULT_SPLIT_TOKENS,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 softmax attention per sequence over its gathered pages, in one piece
    (split_tokens does not change the result; max_queries None: all of a sequence's
    queries)."""
    if out is None:
        out = torch.empty_like(q)
    heads, head_dim = q.shape[1], q.shape[2]
    page_size, kv_heads = k_pages.shape[1], k_pages.shape[2]
    scale = head_dim ** -0.5 if scale is None else float(scale)
    cu = list(range(q.shape[0] + 1)) if cu_seqlens is None else cu_seqlens.tolist()
    for s, ctx in enumerate(context_lens.tolist()):
        first = cu[s]
        n = cu[s + 1] - first if max_queries is None else min(cu[s + 1] - first, max_queries)
        if ctx == 0 or n == 0:
            continue
        pages = block_tables[s, : -(-ctx // page_size)].long()
        keys = k_pages[pages].flatten(0, 1)[:ctx].float()  # [ctx, KV, D]
        values = v_pages[pages].flatten(0, 1)[:ctx].float()
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)  # [ctx, Q, D]
        values = values.repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("nqd,kqd->qnk", q[first:first + n].float(), keys) * scale
        positions = ctx - n + torch.arange(n, device=q.device)
        visible = torch.arange(ctx, device=q.device)[None, :] <= positions[:, None]  # [n, ctx]
        probs = torch.softmax(scores.masked_fill(~visible[None], -torch.inf), dim=-1)
        out[first:first + n] = torch.einsum("qnk,kqd->nqd", probs, values).to(out.dtype)
    return out
