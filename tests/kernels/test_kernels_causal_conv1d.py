"""Mamba2's causal conv1d kernels against their torch reference: the varlen prefill (a
sequence shorter than the kernel keeps part of its old state), the decode update, the
verification window kept for accept(), fresh and padded rows, conv states in place."""

from __future__ import annotations

import pytest
import torch

from baton.kernels.mamba_common import MambaChunks
from baton.kernels.mamba_conv import causal_conv1d, causal_conv1d_ref
from baton.kernels.mamba_conv_step import causal_conv1d_update, causal_conv1d_update_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SENTINEL = 7.0


def assert_close(out, ref, dtype):
    scale = ref.float().abs().max().clamp(min=1.0)
    torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[dtype],
                               atol=TOL[dtype] * scale)


def make(tokens, dtype, seed, width=10, kernel=4, slots=8, spec=4):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE).to(dtype)

    # The conv inputs are a strided slice of the in_proj output, as in the model.
    projected = randn(tokens, width + 7)
    return dict(x=projected[:, 3:3 + width], weight=randn(width, 1, kernel), bias=randn(width),
                states=randn(slots, width, kernel - 1),
                windows=torch.full((slots, width, kernel - 1 + spec), SENTINEL, dtype=dtype,
                                   device=DEVICE))


def run_prefill(fn, inputs, chunks, slots, has_init):
    states = inputs["states"].clone()
    out = torch.full(inputs["x"].shape, SENTINEL, dtype=inputs["x"].dtype, device=DEVICE)
    fn(inputs["x"], inputs["weight"], inputs["bias"], chunks, states, slots,
       has_initial_state=has_init, out=out)
    return out, states


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_prefill_conv_continues_the_slot_state(dtype):
    lens = [9, 2, 0, 5, 8]  # 2 < k - 1: the new state keeps one old column
    inputs = make(sum(lens), dtype, seed=1)
    chunks = MambaChunks.build(lens, 4, DEVICE)
    slots = torch.tensor([4, 1, 2, -1, 0], device=DEVICE)
    has_init = torch.tensor([True, True, True, True, False], device=DEVICE)
    out, states = run_prefill(causal_conv1d, inputs, chunks, slots, has_init)
    ref_out, ref_states = run_prefill(causal_conv1d_ref, inputs, chunks, slots, has_init)
    real = torch.cat([torch.arange(0, 11), torch.arange(16, 24)])
    assert_close(out[real], ref_out[real], dtype)
    assert torch.equal(states, ref_states)  # the state is a copy of inputs: exact
    assert bool((out[11:16] == SENTINEL).all())
    for slot in (2, 3, 5, 6, 7):  # 2: the empty sequence
        assert torch.equal(states[slot], inputs["states"][slot])
    assert torch.equal(states[1][:, 0], inputs["states"][1][:, 2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_update_in_place(dtype):
    inputs = make(5, dtype, seed=2)
    slots = torch.tensor([3, -1, 0, 6, 1], device=DEVICE)
    has_init = torch.tensor([True, True, False, True, True], device=DEVICE)
    results = []
    for fn in (causal_conv1d_update, causal_conv1d_update_ref):
        states = inputs["states"].clone()
        out = torch.full(inputs["x"].shape, SENTINEL, dtype=dtype, device=DEVICE)
        fn(inputs["x"], states, inputs["weight"], inputs["bias"], slots,
           has_initial_state=has_init, out=out)
        results.append((out, states))
    (out, states), (ref_out, ref_states) = results
    real = slots >= 0
    assert_close(out[real], ref_out[real], dtype)
    assert torch.equal(states, ref_states)
    assert bool((out[1] == SENTINEL).all())
    for slot in (2, 4, 5, 7):
        assert torch.equal(states[slot], inputs["states"][slot])


def test_verify_keeps_the_window_and_not_the_state():
    cu = torch.tensor([0, 4, 5, 5, 9], dtype=torch.int32, device=DEVICE)
    inputs = make(9, torch.bfloat16, seed=3)
    slots = torch.tensor([2, 7, -1, 0], device=DEVICE)
    has_init = torch.tensor([True, True, True, False], device=DEVICE)
    results = []
    for fn in (causal_conv1d_update, causal_conv1d_update_ref):
        states, windows = inputs["states"].clone(), inputs["windows"].clone()
        out = fn(inputs["x"], states, inputs["weight"], inputs["bias"], slots,
                 has_initial_state=has_init, cu_seqlens=cu, max_tokens=4, conv_windows=windows)
        results.append((out, states, windows))
    (out, states, windows), (ref_out, _, ref_windows) = results
    assert_close(out, ref_out, torch.bfloat16)
    assert torch.equal(windows, ref_windows) and torch.equal(states, inputs["states"])
    assert bool((windows[7, :, 4:] == SENTINEL).all())  # 1 token: k - 1 + 1 columns
    assert bool((windows[0, :, :3] == 0).all())  # fresh: zeros before the new inputs
    # accept() after n tokens takes columns n .. n + k - 2: the state a decode would leave.
    states = inputs["states"].clone()
    for j in range(4):
        causal_conv1d_update(inputs["x"][j:j + 1], states, inputs["weight"], inputs["bias"],
                             torch.tensor([2], device=DEVICE))
        assert torch.equal(windows[2][:, j + 1:j + 4], states[2])


def test_bad_inputs():
    inputs = make(3, torch.float32, seed=4)
    x, weight, bias, states = (inputs[k] for k in ("x", "weight", "bias", "states"))
    slots = torch.tensor([0, 1, 2], device=DEVICE)
    with pytest.raises(ValueError, match="conv_states"):
        causal_conv1d_update(x, states[:, :, :2], weight, bias, slots)
    with pytest.raises(ValueError, match="conv_states: dtype"):
        causal_conv1d_update(x, states.half(), weight, bias, slots)
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d_update(x, states, weight[:5], bias, slots)
    with pytest.raises(ValueError, match="conv_windows"):
        causal_conv1d_update(x, states, weight, bias, torch.tensor([0], device=DEVICE),
                             cu_seqlens=torch.tensor([0, 3], dtype=torch.int32, device=DEVICE),
                             max_tokens=9, conv_windows=inputs["windows"])
    with pytest.raises(ValueError, match="chunks"):
        causal_conv1d(x, weight, bias, MambaChunks.build([5], 4, DEVICE), states,
                      torch.tensor([0], device=DEVICE))


@pytest.mark.gpu
def test_conv_at_nano_shapes_on_gpu():
    # Nano: conv_dim 6144, 4 taps; a 700-token prefill continuing a slot, a fresh 130-token
    # one, then a decode step of both.
    lens = [700, 130]
    inputs = make(sum(lens), torch.bfloat16, seed=5, width=6144)
    chunks = MambaChunks.build(lens, 128, DEVICE)
    slots = torch.tensor([5, 2], device=DEVICE)
    has_init = torch.tensor([True, False], device=DEVICE)
    out, states = run_prefill(causal_conv1d, inputs, chunks, slots, has_init)
    ref_out, ref_states = run_prefill(causal_conv1d_ref, inputs, chunks, slots, has_init)
    assert_close(out, ref_out, torch.bfloat16)
    assert torch.equal(states, ref_states)
    step = inputs["x"][:2]
    ref = causal_conv1d_update_ref(step, ref_states, inputs["weight"], inputs["bias"], slots)
    got = causal_conv1d_update(step, states, inputs["weight"], inputs["bias"], slots)
    assert_close(got, ref, torch.bfloat16)
    assert torch.equal(states, ref_states)
