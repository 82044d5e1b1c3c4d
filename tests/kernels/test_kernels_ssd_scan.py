"""The Mamba2 chunked scan (chunk cumsum, chunk state, state passing, chunk scan and the
combined prefill scan) against its torch references on varlen batches: sequences continuing
from a slot's state, fresh ones, a padded row (slot -1), an empty sequence, lengths that are
and are not multiples of the chunk, states in fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from baton.kernels.mamba_common import MambaChunks
from baton.kernels.ssd_chunk_scan import chunk_scan, chunk_scan_ref
from baton.kernels.ssd_chunk_state import (
    chunk_cumsum,
    chunk_cumsum_ref,
    chunk_state,
    chunk_state_ref,
)
from baton.kernels.ssd_combined import mamba_chunk_scan, mamba_chunk_scan_ref
from baton.kernels.ssd_state_passing import state_passing, state_passing_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
SENTINEL = 7.0

# Continuing, empty (fresh flag set), exactly two chunks, padded row, T % chunk != 0.
LENS = [13, 0, 16, 4, 21]
SLOTS = [3, 5, 0, -1, 6]
HAS_INIT = [True, True, False, True, True]


def assert_close(out, ref, dtype):
    scale = ref.float().abs().max().clamp(min=1.0)
    torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[dtype],
                               atol=TOL[dtype] * scale)


def make(lens, dtype, seed, heads=4, head_dim=6, groups=2, dstate=5, slots=8,
         state_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    t = sum(lens)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE)

    # x, B and C come from the conv in the model dtype; dt from the projection (raw).
    return dict(
        x=randn(t, heads, head_dim).to(dtype), dt=(randn(t, heads) - 1.0).to(dtype),
        A=-(torch.rand(heads, generator=gen) * 1.5 + 0.3).to(DEVICE),
        B=randn(t, groups, dstate).to(dtype), C=randn(t, groups, dstate).to(dtype),
        D=randn(heads).to(dtype), dt_bias=randn(heads, scale=0.5).to(dtype),
        states=randn(slots, heads, head_dim, dstate).to(state_dtype))


def rows_of(lens, slots):
    """Token rows of the sequences the scan handles (slot >= 0)."""
    starts = [sum(lens[:i]) for i in range(len(lens))]
    return torch.tensor([t for s, n, slot in zip(starts, lens, slots) if slot >= 0
                         for t in range(s, s + n)], dtype=torch.long)


def run_scan(fn, inputs, chunks, slots, has_init, **kw):
    states = inputs["states"].clone()
    out = torch.full(inputs["x"].shape, SENTINEL, dtype=torch.float32, device=DEVICE)
    fn(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], chunks, states, slots,
       D=inputs["D"], dt_bias=inputs["dt_bias"], has_initial_state=has_init, out=out, **kw)
    return out, states


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_prefill_scan_matches_the_recurrence(dtype):
    inputs = make(LENS, dtype, seed=1)
    chunks = MambaChunks.build(LENS, 8, DEVICE)
    slots = torch.tensor(SLOTS, device=DEVICE)
    has_init = torch.tensor(HAS_INIT, device=DEVICE)
    out, states = run_scan(mamba_chunk_scan, inputs, chunks, slots, has_init)
    ref_out, ref_states = run_scan(mamba_chunk_scan_ref, inputs, chunks, slots, has_init)
    rows = rows_of(LENS, SLOTS)
    assert_close(out[rows], ref_out[rows], dtype)
    assert_close(states, ref_states, dtype)
    # Rows of the padded sequence (slot -1) are not written; untouched slots keep their state.
    padded = torch.arange(sum(LENS[:3]), sum(LENS[:4]))
    assert bool((out[padded] == SENTINEL).all())
    for slot in (1, 2, 4, 5, 7):  # 5: the empty sequence has no token, so no new state
        assert torch.equal(states[slot], inputs["states"][slot])
    # The fresh sequence really ignored its slot's old state, the others really used theirs.
    assert not torch.allclose(states[3], inputs["states"][3])


def test_chunking_does_not_change_the_result():
    lens = [17, 8, 1]
    inputs = make(lens, torch.float32, seed=2)
    slots = torch.tensor([0, 1, 2], device=DEVICE)
    results = [run_scan(mamba_chunk_scan, inputs, MambaChunks.build(lens, size, DEVICE),
                        slots, None) for size in (4, 8, 16)]
    for out, states in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(states, results[0][1], rtol=1e-5, atol=1e-5)


def test_a_sequence_gets_the_same_bits_in_any_batch():
    lens = [9, 12]
    inputs = make(lens, torch.float32, seed=3)
    alone = {k: (v[9:] if k not in ("A", "D", "dt_bias", "states") else v)
             for k, v in inputs.items()}
    out_b, states_b = run_scan(mamba_chunk_scan, inputs, MambaChunks.build(lens, 8, DEVICE),
                               torch.tensor([0, 1], device=DEVICE), None)
    out_a, states_a = run_scan(mamba_chunk_scan, alone, MambaChunks.build([12], 8, DEVICE),
                               torch.tensor([1], device=DEVICE), None)
    assert torch.equal(out_b[9:], out_a) and torch.equal(states_b[1], states_a[1])


def test_bf16_state_slots_round_once():
    inputs = make([11, 6], torch.bfloat16, seed=4, state_dtype=torch.bfloat16)
    chunks = MambaChunks.build([11, 6], 4, DEVICE)
    slots = torch.tensor([2, 0], device=DEVICE)
    out, states = run_scan(mamba_chunk_scan, inputs, chunks, slots, None)
    ref_out, ref_states = run_scan(mamba_chunk_scan_ref, inputs, chunks, slots, None)
    assert states.dtype == torch.bfloat16
    assert_close(out, ref_out, torch.bfloat16)
    assert_close(states, ref_states, torch.bfloat16)


def test_each_step_matches_its_reference():
    lens = [10, 3, 0, 8]
    inputs = make(lens, torch.bfloat16, seed=5)
    chunks = MambaChunks.build(lens, 4, DEVICE)
    x, dt, A, B, C = (inputs[k] for k in ("x", "dt", "A", "B", "C"))
    args = dict(dt_bias=inputs["dt_bias"], dt_limit=(0.05, 2.0))
    dt_out, da_cs = chunk_cumsum(dt, A, chunks, **args)
    ref_dt, ref_cs = chunk_cumsum_ref(dt, A, chunks, **args)
    torch.testing.assert_close(dt_out, ref_dt, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(da_cs, ref_cs, rtol=1e-5, atol=1e-5)
    assert float(dt_out[dt_out > 0].min()) >= 0.05 and float(dt_out.max()) <= 2.0
    states = chunk_state(x, B, ref_dt, ref_cs, chunks)
    ref_states = chunk_state_ref(x, B, ref_dt, ref_cs, chunks)
    assert_close(states, ref_states, torch.bfloat16)
    slots = torch.tensor([4, 1, 2, -1], device=DEVICE)
    has_init = torch.tensor([True, False, True, True], device=DEVICE)
    starts, ssm = ref_states.clone(), inputs["states"].clone()
    state_passing(starts, ref_cs, chunks, ssm, slots, has_init)
    ref_starts, ref_ssm = ref_states.clone(), inputs["states"].clone()
    state_passing_ref(ref_starts, ref_cs, chunks, ref_ssm, slots, has_init)
    torch.testing.assert_close(starts, ref_starts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ssm, ref_ssm, rtol=1e-5, atol=1e-5)
    assert torch.equal(starts[chunks.num_chunks - 2:], ref_states[chunks.num_chunks - 2:])
    out = torch.full(x.shape, SENTINEL, device=DEVICE)
    chunk_scan(x, B, C, ref_dt, ref_cs, ref_starts, chunks, slots, D=inputs["D"], out=out)
    ref = chunk_scan_ref(x, B, C, ref_dt, ref_cs, ref_starts, chunks, slots, D=inputs["D"])
    assert_close(out[:13], ref[:13], torch.bfloat16)
    assert bool((out[13:] == SENTINEL).all())


def test_chunk_table():
    chunks = MambaChunks.build([5, 0, 8, 9], 4)
    assert chunks.cu_seqlens.tolist() == [0, 5, 5, 13, 22]
    assert chunks.seq_chunks.tolist() == [0, 2, 2, 4, 7]
    assert chunks.chunk_seq.tolist() == [0, 0, 2, 2, 3, 3, 3]
    assert chunks.chunk_start.tolist() == [0, 4, 5, 9, 13, 17, 21]
    assert chunks.chunk_len.tolist() == [4, 1, 4, 4, 4, 4, 1]
    assert (chunks.num_seqs, chunks.num_chunks, chunks.num_tokens, chunks.max_seqlen) == \
        (4, 7, 22, 9)


def test_bad_inputs():
    inputs = make([6], torch.float32, seed=6)
    chunks = MambaChunks.build([6], 4, DEVICE)
    slots = torch.tensor([0], device=DEVICE)
    x, dt, A, B, C, states = (inputs[k] for k in ("x", "dt", "A", "B", "C", "states"))
    with pytest.raises(ValueError, match="chunk_size"):
        MambaChunks.build([6], 0)
    with pytest.raises(ValueError, match="seq_lens"):
        MambaChunks.build([3, -1], 4)
    with pytest.raises(ValueError, match="dt_limit"):
        mamba_chunk_scan(x, dt, A, B, C, chunks, states, slots, dt_limit=(1.0, 0.5))
    with pytest.raises(ValueError, match="slot_ids"):
        mamba_chunk_scan(x, dt, A, B, C, chunks, states, torch.tensor([0, 1], device=DEVICE))
    with pytest.raises(ValueError, match="ssm_states"):
        mamba_chunk_scan(x, dt, A, B, C, chunks, states[:, :, :2], slots)
    with pytest.raises(ValueError, match="groups"):
        mamba_chunk_scan(x, dt, A, B[:, :1].repeat(1, 3, 1), C[:, :1].repeat(1, 3, 1),
                         chunks, states, slots)
    with pytest.raises(ValueError, match="chunks"):
        mamba_chunk_scan(x, dt, A, B, C, MambaChunks.build([9], 4, DEVICE), states, slots)
    with pytest.raises(ValueError, match="has_initial_state"):
        mamba_chunk_scan(x, dt, A, B, C, chunks, states, slots,
                         has_initial_state=torch.tensor([1], device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_prefill_scan_at_nano_shapes_on_gpu(state_dtype):
    # Nemotron 3 Nano: 64 heads of 64, 8 groups, state 128, chunk 128; a 1000-token prompt
    # continuing a slot, a fresh 300-token one and a 128-token one, in bf16 on tensor cores.
    lens = [1000, 300, 128]
    inputs = make(lens, torch.bfloat16, seed=7, heads=64, head_dim=64, groups=8, dstate=128,
                  slots=4, state_dtype=state_dtype)
    inputs["x"], inputs["B"], inputs["C"] = (inputs[k] * 0.5 for k in ("x", "B", "C"))
    chunks = MambaChunks.build(lens, 128, DEVICE)
    slots = torch.tensor([2, 0, 3], device=DEVICE)
    has_init = torch.tensor([True, False, True], device=DEVICE)
    out, states = run_scan(mamba_chunk_scan, inputs, chunks, slots, has_init)
    ref_out, ref_states = run_scan(mamba_chunk_scan_ref, inputs, chunks, slots, has_init)
    assert_close(out, ref_out, torch.bfloat16)
    assert_close(states, ref_states, torch.bfloat16)
    assert torch.equal(states[1], inputs["states"][1])
