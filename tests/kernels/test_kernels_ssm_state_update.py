"""The slot-indexed Mamba2 state update (decode and speculative verification) against its
torch reference: the state changes in place in its slot, fresh rows start from zeros, padded
rows (slot -1) and other slots stay as they were, verification writes one snapshot per token
into the spec buffer and leaves the slot alone."""

from __future__ import annotations

import pytest
import torch

from baton.kernels.mamba_step import ssm_state_update, ssm_state_update_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
SENTINEL = 7.0


def assert_close(out, ref, dtype):
    scale = ref.float().abs().max().clamp(min=1.0)
    torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[dtype],
                               atol=TOL[dtype] * scale)


def make(tokens, dtype, seed, heads=4, head_dim=6, groups=2, dstate=12, slots=8,
         state_dtype=torch.float32, spec=4):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    # x, B, C as strided views of one conv output row, as the model splits it.
    width = heads * head_dim + 2 * groups * dstate
    xbc = randn(tokens, width).to(dtype)
    x, b, c = xbc.split([heads * head_dim, groups * dstate, groups * dstate], dim=-1)
    return dict(
        x=x.view(tokens, heads, head_dim), B=b.view(tokens, groups, dstate),
        C=c.view(tokens, groups, dstate), dt=(randn(tokens, heads) - 1.0).to(dtype),
        A=-(torch.rand(heads, generator=gen) + 0.2).to(DEVICE), D=randn(heads).to(dtype),
        dt_bias=(randn(heads) * 0.5).to(dtype),
        states=randn(slots, heads, head_dim, dstate).to(state_dtype),
        snapshots=torch.full((slots, spec, heads, head_dim, dstate), SENTINEL,
                             dtype=state_dtype, device=DEVICE))


def run(fn, inputs, slots, **kw):
    states, snapshots = inputs["states"].clone(), inputs["snapshots"].clone()
    out = torch.full(inputs["x"].shape, SENTINEL, dtype=torch.float32, device=DEVICE)
    spec = kw.pop("spec", False)
    fn(states, inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], slots,
       D=inputs["D"], dt_bias=inputs["dt_bias"], out=out,
       snapshots=snapshots if spec else None, **kw)
    return out, states, snapshots


@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32),
                                               (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float32),
                                               (torch.bfloat16, torch.bfloat16)])
def test_decode_step_in_place(dtype, state_dtype):
    inputs = make(5, dtype, seed=1, state_dtype=state_dtype)
    slots = torch.tensor([6, -1, 0, 3, 2], device=DEVICE)
    has_init = torch.tensor([True, True, False, True, True], device=DEVICE)
    out, states, _ = run(ssm_state_update, inputs, slots, has_initial_state=has_init,
                         dt_limit=(0.01, 3.0))
    ref_out, ref_states, _ = run(ssm_state_update_ref, inputs, slots,
                                 has_initial_state=has_init, dt_limit=(0.01, 3.0))
    real = slots >= 0
    assert_close(out[real], ref_out[real], dtype)
    assert_close(states, ref_states, state_dtype)
    assert bool((out[1] == SENTINEL).all())  # the padded row
    for slot in (1, 4, 5, 7):
        assert torch.equal(states[slot], inputs["states"][slot])
    assert not torch.equal(states[6], inputs["states"][6])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verify_writes_one_snapshot_per_token(dtype):
    # 1 + K = 4 tokens for two sequences, 2 for a shorter one, a padded row, a fresh slot.
    cu = torch.tensor([0, 4, 6, 6, 10], dtype=torch.int32, device=DEVICE)
    inputs = make(10, dtype, seed=2)
    slots = torch.tensor([5, 1, -1, 7], device=DEVICE)
    has_init = torch.tensor([True, False, True, True], device=DEVICE)
    kw = dict(cu_seqlens=cu, max_tokens=4, has_initial_state=has_init, spec=True)
    out, states, snaps = run(ssm_state_update, inputs, slots, **kw)
    ref_out, _, ref_snaps = run(ssm_state_update_ref, inputs, slots, **kw)
    assert_close(out, ref_out, dtype)
    assert_close(snaps, ref_snaps, torch.float32 if dtype == torch.float32 else dtype)
    assert torch.equal(states, inputs["states"])  # accept() picks a snapshot later
    assert bool((snaps[1, 2:] == SENTINEL).all())  # only 2 tokens for slot 1
    assert bool((snaps[[0, 2, 3, 4, 6]] == SENTINEL).all())
    # The snapshot after token j is the state a plain decode of tokens 0..j would leave.
    step = inputs["states"].clone()
    for j in range(4):
        one = {k: (v[j:j + 1] if k in ("x", "B", "C", "dt") else v) for k, v in inputs.items()}
        one["states"] = step
        _, step, _ = run(ssm_state_update, one, torch.tensor([5], device=DEVICE))
        assert_close(snaps[5, j], step[5], dtype)


def test_multi_token_continuation_without_snapshots_writes_the_final_state():
    cu = torch.tensor([0, 3, 5], dtype=torch.int32, device=DEVICE)
    inputs = make(5, torch.float32, seed=3)
    slots = torch.tensor([2, 4], device=DEVICE)
    out, states, _ = run(ssm_state_update, inputs, slots, cu_seqlens=cu, max_tokens=3)
    ref_out, ref_states, _ = run(ssm_state_update_ref, inputs, slots, cu_seqlens=cu,
                                 max_tokens=3)
    assert_close(out, ref_out, torch.float32)
    assert_close(states, ref_states, torch.float32)


def test_bad_inputs():
    inputs = make(2, torch.float32, seed=4)
    args = [inputs[k] for k in ("states", "x", "dt", "A", "B", "C")]
    slots = torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(ValueError, match="slot_ids"):
        ssm_state_update(*args, slots.float())
    with pytest.raises(ValueError, match="max_tokens"):
        ssm_state_update(*args, slots, max_tokens=2)
    with pytest.raises(ValueError, match="snapshots"):
        ssm_state_update(*args, torch.tensor([0], device=DEVICE),
                         cu_seqlens=torch.tensor([0, 2], dtype=torch.int32, device=DEVICE),
                         max_tokens=5, snapshots=inputs["snapshots"])
    with pytest.raises(ValueError, match="cu_seqlens"):
        ssm_state_update(*args, slots, cu_seqlens=torch.tensor([0, 1, 2], device=DEVICE))
    with pytest.raises(ValueError, match="dt"):
        ssm_state_update(args[0], args[1], args[2][:1], *args[3:], slots)


@pytest.mark.gpu
def test_decode_and_verify_at_nano_shapes_in_a_cuda_graph():
    # Nano: 64 heads of 64, 8 groups, state 128; batch 16 of which 3 padded rows; a graph
    # captured once replays new inputs exactly as eager launches compute them.
    inputs = make(16, torch.bfloat16, seed=5, heads=64, head_dim=64, groups=8, dstate=128,
                  slots=20)
    slots = torch.arange(16, device=DEVICE)
    slots[13:] = -1
    eager_out, eager_states, _ = run(ssm_state_update, inputs, slots)
    ref_out, ref_states, _ = run(ssm_state_update_ref, inputs, slots)
    assert_close(eager_out[:13], ref_out[:13], torch.bfloat16)
    assert_close(eager_states, ref_states, torch.float32)
    states = inputs["states"].clone()
    out = torch.zeros(inputs["x"].shape, device=DEVICE)
    static = {k: inputs[k].clone() for k in ("x", "dt", "B", "C")}
    fresh = make(16, torch.bfloat16, seed=6, heads=64, head_dim=64, groups=8, dstate=128,
                 slots=20)

    def step():
        ssm_state_update(states, static["x"], static["dt"], inputs["A"], static["B"],
                         static["C"], slots, D=inputs["D"], dt_bias=inputs["dt_bias"], out=out)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    states.copy_(inputs["states"])
    for k in static:
        static[k].copy_(fresh[k])
    graph.replay()
    fresh.update({k: inputs[k] for k in ("states", "A", "D", "dt_bias")})
    want_out, want_states, _ = run(ssm_state_update, fresh, slots)
    assert torch.equal(out[:13], want_out[:13]) and torch.equal(states, want_states)
