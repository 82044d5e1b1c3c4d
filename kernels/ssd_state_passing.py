"""The third step of the Mamba2 chunked scan: carry the state across each sequence's chunks,
from the sequence's slot state (or zeros), and write the final state back into the slot.

Shapes: S sequences, NC chunks, h heads, p head dim, n state size; ssm_states
[num_slots, h, p, n] is the cache's per-layer SSM state (fp32 or bf16).

For the chunks c = c0 .. c1 - 1 of sequence s, in order, with s_0 the slot's state:

    start[c]  = s_c                                     (written over states[c], in place)
    s_{c+1}   = exp(da_cs[c, :, L-1]) * s_c + states[c]
    ssm_states[slot_ids[s]] = s_{c1}                    (in the state dtype)

One program per (sequence, head, block of p * n) walks the chunks in order, so the sum is
the same for every batch; it reads the slot's state before it writes it. A sequence whose
slot is -1 or that has no chunk is left alone (its chunks keep their own states).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.kernels.mamba_common import MambaChunks, check_rows
from baton.kernels.triton_common import INTERPRET, check_shape, check_triton_device, to_dtype_rn


@triton.jit
def _state_passing_kernel(
    # pointers
    states_ptr, da_cs_ptr, ssm_ptr, slot_ptr, has_init_ptr, seq_chunks_ptr,
    # sizes
    dstate, state_size, chunk_size,
    # strides
    stride_st_c, stride_st_h, stride_cs_c, stride_cs_h,
    stride_ssm_s, stride_ssm_h, stride_ssm_p, stride_ssm_n,
    # meta-parameters
    BLOCK: tl.constexpr, HAS_INIT_FLAGS: tl.constexpr, INTERPRETED: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    state_ty: tl.constexpr = ssm_ptr.dtype.element_ty
    slot = tl.load(slot_ptr + seq).to(tl.int64)
    c0 = tl.load(seq_chunks_ptr + seq)
    c1 = tl.load(seq_chunks_ptr + seq + 1)
    if (slot >= 0) & (c1 > c0):
        offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)  # flat index p * n + n'
        mask = offs < state_size
        ssm = (ssm_ptr + slot * stride_ssm_s + head * stride_ssm_h
               + (offs // dstate) * stride_ssm_p + (offs % dstate) * stride_ssm_n)
        load_mask = mask
        if HAS_INIT_FLAGS:
            load_mask = mask & (tl.load(has_init_ptr + seq) != 0)
        state = tl.load(ssm, mask=load_mask, other=0.0).to(tl.float32)
        chunk = states_ptr + c0.to(tl.int64) * stride_st_c + head * stride_st_h + offs
        last = da_cs_ptr + c0.to(tl.int64) * stride_cs_c + head * stride_cs_h + chunk_size - 1
        for _ in range(c0, c1):
            own = tl.load(chunk, mask=mask, other=0.0)
            tl.store(chunk, state, mask=mask)
            state = state * tl.exp(tl.load(last)) + own
            chunk += stride_st_c
            last += stride_cs_c
        tl.store(ssm, to_dtype_rn(state, state_ty, INTERPRETED), mask=mask)


def state_passing(states: torch.Tensor, da_cs: torch.Tensor, chunks: MambaChunks,
                  ssm_states: torch.Tensor, slot_ids: torch.Tensor,
                  has_initial_state: torch.Tensor | None = None) -> None:
    """In place: states [NC, h, p, n] fp32 (chunk_state's) become each chunk's start state;
    ssm_states[slot_ids[s]] [h, p, n] becomes sequence s's final state. da_cs [NC, h, L]."""
    check_triton_device(states, da_cs, ssm_states)
    nc, L = chunks.num_chunks, chunks.chunk_size
    check_shape("states", states, (nc, None, None, None), "[NC, h, p, n]")
    heads, head_dim, dstate = states.shape[1:]
    check_shape("da_cs", da_cs, (nc, heads, L), "[NC, h, L]")
    check_shape("ssm_states", ssm_states, (None, heads, head_dim, dstate), "[slots, h, p, n]")
    if not states.is_contiguous() or states.dtype != torch.float32:
        raise ValueError("states: must be contiguous fp32 (chunk_state's output)")
    if not da_cs.is_contiguous() or da_cs.dtype != torch.float32:
        raise ValueError("da_cs: must be contiguous fp32 (chunk_cumsum's output)")
    check_rows(slot_ids, has_initial_state, None, chunks.num_seqs)
    if nc == 0:
        return
    size = head_dim * dstate
    block = min(1024 if states.is_cuda else 4096, triton.next_power_of_2(size))
    _state_passing_kernel[(chunks.num_seqs, heads, triton.cdiv(size, block))](
        states, da_cs, ssm_states, slot_ids,
        has_initial_state if has_initial_state is not None else slot_ids, chunks.seq_chunks,
        dstate, size, L,
        states.stride(0), states.stride(1), da_cs.stride(0), da_cs.stride(1),
        *ssm_states.stride(),
        BLOCK=block, HAS_INIT_FLAGS=has_initial_state is not None, INTERPRETED=INTERPRET,
        num_warps=4,
    )


def state_passing_ref(states: torch.Tensor, da_cs: torch.Tensor, chunks: MambaChunks,
                      ssm_states: torch.Tensor, slot_ids: torch.Tensor,
                      has_initial_state: torch.Tensor | None = None) -> None:
    seq_chunks = chunks.seq_chunks.tolist()
    flags = None if has_initial_state is None else has_initial_state.tolist()
    for s, slot in enumerate(slot_ids.tolist()):
        c0, c1 = seq_chunks[s], seq_chunks[s + 1]
        if slot < 0 or c1 == c0:
            continue
        state = ssm_states[slot].float()
        if flags is not None and not flags[s]:
            state = torch.zeros_like(state)
        for c in range(c0, c1):
            own = states[c].clone()
            states[c] = state
            state = state * torch.exp(da_cs[c, :, -1])[:, None, None] + own
        ssm_states[slot] = state.to(ssm_states.dtype)
