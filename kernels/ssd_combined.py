"""The Mamba2 chunked (SSD) scan of a prefill over a varlen batch, continuing each sequence
from its state slot and writing its final state back: chunk cumsum -> chunk state -> state
passing -> chunk scan (four launches, every Mamba layer of a step sharing one MambaChunks).

Shapes: T packed tokens, S sequences, h heads, p head dim, g groups, n state size.

The result is the model's ssd_chunk_scan per sequence (the same chunking: chunks start at
the sequence's first new token) plus the D skip; the reference below is the recurrence
itself, token by token, which the chunked form equals up to rounding.
"""

from __future__ import annotations

import torch

from baton.kernels.mamba_common import MambaChunks, check_dt_limit, check_rows
from baton.kernels.mamba_step import ssm_state_update_ref
from baton.kernels.ssd_chunk_scan import chunk_scan
from baton.kernels.ssd_chunk_state import chunk_cumsum, chunk_state
from baton.kernels.ssd_state_passing import state_passing
from baton.kernels.triton_common import check_shape, check_triton_device


def mamba_chunk_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                     C: torch.Tensor, chunks: MambaChunks, ssm_states: torch.Tensor,
                     slot_ids: torch.Tensor, *, D: torch.Tensor | None = None,
                     dt_bias: torch.Tensor | None = None,
                     dt_limit: tuple[float, float] = (0.0, float("inf")),
                     has_initial_state: torch.Tensor | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """The prefill scan of a packed batch, in place on the state slots.

    x [T, h, p] (the conv output), dt [T, h] raw, A [h] negative, B and C [T, g, n], chunks
    (MambaChunks.build(seq_lens, chunk_size)), ssm_states [num_slots, h, p, n] (the cache's
    layer state, fp32 or bf16), slot_ids [S] (-1: sequence skipped, slot and output rows
    untouched), D and dt_bias [h], has_initial_state [S] bool (False: start from zeros).
    Returns y [T, h, p] (fp32 unless `out` is given) with the D skip when D is given;
    ssm_states[slot_ids[s]] holds sequence s's final state (sequences of length 0 are left
    alone).
    """
    check_triton_device(x, dt, A, B, C, ssm_states, slot_ids)
    check_dt_limit(dt_limit)
    check_shape("x", x, (None, None, None), "[T, h, p]")
    t, heads, head_dim = x.shape
    check_shape("dt", dt, (t, heads), "[T, h]")
    check_shape("ssm_states", ssm_states, (None, heads, head_dim, B.shape[-1]),
                "[slots, h, p, n]")
    check_rows(slot_ids, has_initial_state, None, chunks.num_seqs)
    dt_out, da_cs = chunk_cumsum(dt, A, chunks, dt_bias=dt_bias, dt_limit=dt_limit)
    states = chunk_state(x, B, dt_out, da_cs, chunks)
    state_passing(states, da_cs, chunks, ssm_states, slot_ids, has_initial_state)
    return chunk_scan(x, B, C, dt_out, da_cs, states, chunks, slot_ids, D=D, out=out)


def mamba_chunk_scan_ref(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                         C: torch.Tensor, chunks: MambaChunks, ssm_states: torch.Tensor,
                         slot_ids: torch.Tensor, *, D: torch.Tensor | None = None,
                         dt_bias: torch.Tensor | None = None,
                         dt_limit: tuple[float, float] = (0.0, float("inf")),
                         has_initial_state: torch.Tensor | None = None,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """The recurrence token by token (ssm_state_update's reference over whole sequences)."""
    return ssm_state_update_ref(ssm_states, x, dt, A, B, C, slot_ids, D=D, dt_bias=dt_bias,
                                dt_limit=dt_limit, has_initial_state=has_initial_state,
                                cu_seqlens=chunks.cu_seqlens,
                                max_tokens=max(1, chunks.max_seqlen), out=out)
