"""store_kv against its index_put reference: tokens scattered over shuffled pages of an odd
page size, padded rows (-1) writing nothing, a strided view of a projection as input, and
every other row of the cache left as it was."""

from __future__ import annotations

import pytest
import torch

from baton.kernels.kv_store import store_kv, store_kv_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make(dtype, seed, tokens=11, kv_heads=3, head_dim=12, num_pages=9, page_size=5):
    gen = torch.Generator().manual_seed(seed)
    projected = torch.randn(tokens, 2 * kv_heads * head_dim + 7, generator=gen).to(dtype)
    # k and v as the strided column slices of one projection (rows 2 * KV * D + 7 wide).
    k = projected[:, :kv_heads * head_dim].reshape(tokens, kv_heads, head_dim)
    v = projected[:, kv_heads * head_dim:2 * kv_heads * head_dim].reshape(tokens, kv_heads,
                                                                          head_dim)
    k_pages = torch.randn(num_pages, page_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_pages = torch.randn(num_pages, page_size, kv_heads, head_dim, generator=gen).to(dtype)
    rows = torch.randperm(num_pages * page_size, generator=gen)[:tokens]
    rows[[2, 5, tokens - 1]] = -1  # padded rows, the last one included
    return [t.to(DEVICE) for t in (k, v, k_pages, v_pages, rows)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_store_kv_matches_reference_and_skips_padded_rows(dtype):
    k, v, k_pages, v_pages, rows = make(dtype, seed=0)
    before_k, before_v = k_pages.clone(), v_pages.clone()
    want_k, want_v = k_pages.clone(), v_pages.clone()
    store_kv_ref(k, v, want_k, want_v, rows)
    store_kv(k, v, k_pages, v_pages, rows)
    assert torch.equal(k_pages, want_k) and torch.equal(v_pages, want_v)  # a copy: exact
    written = torch.zeros(k_pages.shape[0] * k_pages.shape[1], dtype=torch.bool, device=DEVICE)
    written[rows[rows >= 0]] = True
    flat_k, flat_before = k_pages.flatten(0, 1), before_k.flatten(0, 1)
    assert torch.equal(flat_k[~written], flat_before[~written])
    assert torch.equal(v_pages.flatten(0, 1)[~written], before_v.flatten(0, 1)[~written])
    real = (rows >= 0).nonzero().flatten()
    assert torch.equal(flat_k[rows[real]], k[real])


def test_store_kv_converts_to_the_pages_dtype_and_takes_int32_rows():
    k, v, k_pages, v_pages, rows = make(torch.float32, seed=1)
    k_pages, v_pages = k_pages.bfloat16(), v_pages.bfloat16()
    want_k, want_v = k_pages.clone(), v_pages.clone()
    store_kv_ref(k, v, want_k, want_v, rows)
    store_kv(k, v, k_pages, v_pages, rows.int())
    assert torch.equal(k_pages, want_k) and torch.equal(v_pages, want_v)


def test_store_kv_refuses_bad_arguments():
    k, v, k_pages, v_pages, rows = make(torch.float32, seed=2)
    with pytest.raises(ValueError, match="kv_slots"):
        store_kv(k, v, k_pages, v_pages, rows[:-1])
    with pytest.raises(ValueError, match="kv_slots"):
        store_kv(k, v, k_pages, v_pages, rows.float())
    with pytest.raises(ValueError, match="k_pages"):
        store_kv(k, v, k_pages[:, :, :2], v_pages, rows)
    with pytest.raises(ValueError, match="v:"):
        store_kv(k, v[:, :2], k_pages, v_pages, rows)
