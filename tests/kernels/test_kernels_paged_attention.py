"""Paged attention (decode, verify, prefill over cached pages) against the torch reference:
GQA, contexts spanning many pages of an odd page size in shuffled order, context split into
several parts, padded rows (context 0) untouched, and a sequence's bits independent of the
batch it runs in."""

from __future__ import annotations

import pytest
import torch

from baton.kernels.attention_decode import (
    paged_attention,
    paged_attention_ref,
    split_tokens_for,
)
from baton.kernels.attention_prefill import prefill_attention, prefill_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SENTINEL = 7.0


def assert_close(out, ref, dtype):
    scale = ref.float().abs().max().clamp(min=1.0)
    torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[dtype],
                               atol=TOL[dtype] * scale)


def make(context_lens, queries, dtype, seed, heads=6, kv_heads=2, head_dim=12, page_size=5,
         max_pages=24):
    """Pages handed out in a shuffled order (page ids far apart, not ascending)."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-c // page_size) for c in context_lens]
    num_pages = sum(need) + 3
    order = torch.randperm(num_pages, generator=gen)
    tables = torch.full((len(context_lens), max_pages), -1, dtype=torch.int32)
    used = 0
    for s, n in enumerate(need):
        tables[s, :n] = order[used:used + n]
        used += n

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    return dict(q=randn(queries, heads, head_dim),
                k_pages=randn(num_pages, page_size, kv_heads, head_dim),
                v_pages=randn(num_pages, page_size, kv_heads, head_dim),
                block_tables=tables.to(DEVICE),
                context_lens=torch.tensor(context_lens, dtype=torch.int32, device=DEVICE))


def call(fn, inputs, *args, **kw):
    out = torch.full(inputs["q"].shape, SENTINEL, dtype=inputs["q"].dtype, device=DEVICE)
    return fn(inputs["q"], inputs["k_pages"], inputs["v_pages"], inputs["block_tables"],
              inputs["context_lens"], *args, out=out, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("split_tokens", [16, 256])
def test_decode_matches_reference(dtype, split_tokens):
    # 81 tokens: 17 pages of 5, 6 splits of 16; a padded row; a 1-token context.
    ctx = [37, 0, 1, 81, 12]
    inputs = make(ctx, len(ctx), dtype, seed=1)
    out = call(paged_attention, inputs, split_tokens=split_tokens)
    ref = call(paged_attention_ref, inputs)
    real = torch.tensor(ctx) > 0
    assert_close(out[real], ref[real], dtype)
    assert bool((out[1] == SENTINEL).all())


def test_verify_queries_are_causal_among_themselves():
    # 1 + K = 4 queries for two sequences, 2 for one, a padded row.
    ctx = [44, 9, 0, 30]
    cu = torch.tensor([0, 4, 6, 6, 10], dtype=torch.int32, device=DEVICE)
    inputs = make(ctx, 10, torch.bfloat16, seed=2, heads=8, kv_heads=2)
    out = call(paged_attention, inputs, cu_seqlens=cu, max_queries=4, split_tokens=16)
    ref = call(paged_attention_ref, inputs, cu_seqlens=cu, max_queries=4)
    assert_close(out, ref, torch.bfloat16)
    # The last query of a sequence sees everything: it equals a decode of that token alone.
    last = {k: v for k, v in inputs.items()}
    last["q"], last["block_tables"] = inputs["q"][[3]], inputs["block_tables"][:1]
    last["context_lens"] = inputs["context_lens"][:1]
    assert torch.equal(call(paged_attention, last, split_tokens=16)[0], out[3])


def test_a_sequence_gets_the_same_bits_in_any_batch():
    ctx = [70, 23, 5]
    inputs = make(ctx, 3, torch.float32, seed=3)
    batch = call(paged_attention, inputs, split_tokens=32)
    # Alone, behind a padded row, with a wider block table (a bigger CUDA-graph bucket).
    alone = dict(inputs)
    wide = torch.full((2, 40), -1, dtype=torch.int32, device=DEVICE)
    wide[1, :24] = inputs["block_tables"][0]
    alone.update(q=torch.cat([inputs["q"][1:2], inputs["q"][:1]]), block_tables=wide,
                 context_lens=torch.tensor([0, 70], dtype=torch.int32, device=DEVICE))
    padded = call(paged_attention, alone, split_tokens=32)
    assert torch.equal(padded[1], batch[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_prefill_over_cached_pages(dtype):
    # A chunk of 13 after 20 cached tokens, a fresh 9-token prompt, a padded row, one query.
    ctx = [33, 9, 0, 12]
    lens = [13, 9, 0, 1]
    cu = torch.tensor([0, 13, 22, 22, 23], dtype=torch.int32, device=DEVICE)
    inputs = make(ctx, sum(lens), dtype, seed=4)
    out = call(prefill_attention, inputs, cu, max(lens))
    ref = call(prefill_attention_ref, inputs, cu, max(lens))
    assert_close(out, ref, dtype)
    # The fresh prompt is plain causal attention over its own tokens.
    pages = inputs["block_tables"][1, :2].long()
    keys = inputs["k_pages"][pages].flatten(0, 1)[:9].float()
    values = inputs["v_pages"][pages].flatten(0, 1)[:9].float()
    q = inputs["q"][13:22].float().transpose(0, 1)  # [Q, 9, D]
    want = torch.nn.functional.scaled_dot_product_attention(
        q, keys.transpose(0, 1).repeat_interleave(3, 0),
        values.transpose(0, 1).repeat_interleave(3, 0), is_causal=True)
    assert_close(out[13:22], want.transpose(0, 1), dtype)


def test_split_size_from_the_longest_context():
    assert split_tokens_for(8192) == 256 and split_tokens_for(100) == 256
    assert split_tokens_for(131072) == 2048 and 262144 / split_tokens_for(262144) <= 64
    assert split_tokens_for(16385) % 16 == 0 and 16385 / split_tokens_for(16385) <= 64
    with pytest.raises(ValueError, match="max_context"):
        split_tokens_for(0)


def test_bad_inputs():
    inputs = make([10, 4], 2, torch.float32, seed=5)
    q, k, v, tables, ctx = (inputs[n] for n in ("q", "k_pages", "v_pages", "block_tables",
                                                "context_lens"))
    with pytest.raises(ValueError, match="context_lens"):
        paged_attention(q, k, v, tables, ctx.long())
    with pytest.raises(ValueError, match="block_tables"):
        paged_attention(q, k, v, tables[:1], ctx)
    with pytest.raises(ValueError, match="query heads"):
        paged_attention(q[:, :5], k, v, tables, ctx)
    with pytest.raises(ValueError, match="split_tokens"):
        paged_attention(q, k, v, tables, ctx, split_tokens=24)
    with pytest.raises(ValueError, match="dtypes"):
        paged_attention(q, k.half(), v, tables, ctx)
    with pytest.raises(ValueError, match="max_queries"):
        paged_attention(q, k, v, tables, ctx, max_queries=2)
    with pytest.raises(ValueError, match="cu_seqlens"):
        prefill_attention(q, k, v, tables, ctx, torch.tensor([0, 2], dtype=torch.int32), 2)


@pytest.mark.gpu
def test_nano_attention_on_gpu_and_in_a_cuda_graph():
    # Nano: 32 query heads, 2 KV heads of 128; pages of 16; decode of 16 sequences at up to
    # 4k tokens (3 padded rows), verify with 1 + 3 queries, a 1000-token prefill chunk.
    ctx = [4096, 1, 513, 2000] * 3 + [0] * 3 + [300]
    inputs = make(ctx, len(ctx), torch.bfloat16, seed=6, heads=32, kv_heads=2, head_dim=128,
                  page_size=16, max_pages=256)
    ref = call(paged_attention_ref, inputs)
    out = call(paged_attention, inputs)
    real = torch.tensor(ctx) > 0
    assert_close(out[real], ref[real], torch.bfloat16)
    static_out = torch.zeros_like(out)
    paged_attention(inputs["q"], inputs["k_pages"], inputs["v_pages"], inputs["block_tables"],
                    inputs["context_lens"], out=static_out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention(inputs["q"], inputs["k_pages"], inputs["v_pages"],
                        inputs["block_tables"], inputs["context_lens"], out=static_out)
    inputs["context_lens"][0] = 4000  # a step later: new lengths, same buffers
    graph.replay()
    want = call(paged_attention, inputs)
    assert torch.equal(static_out[real], want[real])
    cu = torch.arange(0, 4 * len(ctx) + 1, 4, dtype=torch.int32, device=DEVICE)
    # A context holds its 4 new tokens at least.
    lens = inputs["context_lens"]
    verify = dict(inputs, q=torch.randn(4 * len(ctx), 32, 128, device=DEVICE).bfloat16(),
                  context_lens=torch.where(lens > 0, lens.clamp(min=4), lens))
    assert_close(call(paged_attention, verify, cu_seqlens=cu, max_queries=4),
                 call(paged_attention_ref, verify, cu_seqlens=cu, max_queries=4),
                 torch.bfloat16)
    prefill = make([1500, 1000], 1700, torch.bfloat16, seed=7, heads=32, kv_heads=2,
                   head_dim=128, page_size=16, max_pages=128)
    cu = torch.tensor([0, 700, 1700], dtype=torch.int32, device=DEVICE)
    assert_close(call(prefill_attention, prefill, cu, 1000),
                 call(prefill_attention_ref, prefill, cu, 1000), torch.bfloat16)
