"""Writing a step's new keys and values into the paged KV cache, in place, skipping padded
rows: what the attention layers do before paged_attention / prefill_attention read the pages.

Shapes: T tokens, KV key/value heads, D head dim. k, v [T, KV, D] (a strided view of the
projection is fine; the last dimension contiguous); k_pages, v_pages [num_pages, page_size,
KV, D] are the cache's per-layer tensors (ModelCache.kv_pages); kv_slots [T] int64 names the
row each token goes to, page_id * page_size + offset within the page, or -1: the token is a
padded row of a CUDA-graph bucket and writes nothing (an index_put would need a real row for
it, and any real row may belong to a sequence).

One program per (token, KV head) copies its D values of K and of V, converted to the pages'
dtype through fp32 (exact for equal dtypes, rounded to nearest otherwise). The launch reads
nothing back to the host: it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.kernels.triton_common import (
    INTERPRET,
    check_shape,
    check_triton_device,
    check_unit_stride,
    pow2,
    to_dtype_rn,
)


@triton.jit
def _store_kv_kernel(
    # pointers
    k_ptr, v_ptr, k_pages_ptr, v_pages_ptr, slots_ptr,
    # sizes
    head_dim, page_size,
    # strides
    stride_k_t, stride_k_h, stride_v_t, stride_v_h, stride_kp_page, stride_kp_row,
    stride_kp_h, stride_vp_page, stride_vp_row, stride_vp_h,
    # meta-parameters
    BLOCK_D: tl.constexpr, INTERPRETED: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot >= 0:
        page = slot // page_size
        row = slot % page_size
        offs = tl.arange(0, BLOCK_D)
        mask = offs < head_dim
        key = tl.load(k_ptr + token * stride_k_t + head * stride_k_h + offs,
                      mask=mask).to(tl.float32)
        value = tl.load(v_ptr + token * stride_v_t + head * stride_v_h + offs,
                        mask=mask).to(tl.float32)
        tl.store(k_pages_ptr + page * stride_kp_page + row * stride_kp_row + head * stride_kp_h
                 + offs, to_dtype_rn(key, k_pages_ptr.dtype.element_ty, INTERPRETED), mask=mask)
        tl.store(v_pages_ptr + page * stride_vp_page + row * stride_vp_row + head * stride_vp_h
                 + offs, to_dtype_rn(value, v_pages_ptr.dtype.element_ty, INTERPRETED),
                 mask=mask)


def check_store_args(k: torch.Tensor, v: torch.Tensor, k_pages: torch.Tensor,
                     v_pages: torch.Tensor, kv_slots: torch.Tensor) -> None:
    check_shape("k", k, (None, None, None), "[T, KV, D]")
    t, kv_heads, head_dim = k.shape
    check_shape("v", v, (t, kv_heads, head_dim), "k's shape")
    check_shape("k_pages", k_pages, (None, None, kv_heads, head_dim),
                "[pages, page_size, KV, D]")
    check_shape("v_pages", v_pages, tuple(k_pages.shape), "k_pages' shape")
    if tuple(kv_slots.shape) != (t,) or kv_slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"kv_slots: expected int32/int64 [{t}], got {kv_slots.dtype} "
                         f"{tuple(kv_slots.shape)}")
    for name, tensor in (("k", k), ("v", v), ("k_pages", k_pages), ("v_pages", v_pages)):
        check_unit_stride(name, tensor)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
             kv_slots: torch.Tensor) -> None:
    """k, v [T, KV, D] into k_pages, v_pages [num_pages, page_size, KV, D] at the rows
    kv_slots [T] (page_id * page_size + offset; -1: not written). In place."""
    check_triton_device(k, v, k_pages, v_pages, kv_slots)
    check_store_args(k, v, k_pages, v_pages, kv_slots)
    t, kv_heads, head_dim = k.shape
    if t == 0:
        return
    _store_kv_kernel[(t, kv_heads)](
        k, v, k_pages, v_pages, kv_slots,
        head_dim, k_pages.shape[1],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_pages.stride(0),
        k_pages.stride(1), k_pages.stride(2), v_pages.stride(0), v_pages.stride(1),
        v_pages.stride(2),
        BLOCK_D=pow2(head_dim), INTERPRETED=INTERPRET, num_warps=1 if head_dim <= 128 else 2,
    )


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_pages: torch.Tensor,
                 v_pages: torch.Tensor, kv_slots: torch.Tensor) -> None:
    """The same writes through index_put on the flattened pages (it reads the mask back)."""
    check_store_args(k, v, k_pages, v_pages, kv_slots)
    keep = kv_slots >= 0
    rows = kv_slots[keep].long()
    kv_heads, head_dim = k.shape[1], k.shape[2]
    k_pages.view(-1, kv_heads, head_dim)[rows] = k[keep].to(k_pages.dtype)
    v_pages.view(-1, kv_heads, head_dim)[rows] = v[keep].to(v_pages.dtype)
