"""NVFP4 quantize/dequantize: the torch reference against an independent brute-force model,
the format's edge cases (ties, saturation, zero blocks, negative zero, scale underflow)."""

from __future__ import annotations

import pytest
import torch

from baton.kernels import nvfp4

MAGNITUDES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def nearest_code_bruteforce(q: float) -> int:
    """Nearest E2M1 magnitude by distance in float64, ties to the even code, sign kept."""
    mag = min(abs(q), 6.0)
    best = min(range(8), key=lambda c: (abs(MAGNITUDES[c] - mag), c % 2))
    return best | (8 if q < 0 else 0)


def quantize_bruteforce(w: torch.Tensor):
    """Element by element, in float64 where exactness allows, fp32 where the format says."""
    n, k = w.shape
    wf = w.float()
    amax = wf.abs().max()
    gs = amax / torch.tensor(2688.0)
    gs = torch.tensor(1.0) if gs == 0 else gs
    codes = torch.zeros(n, k, dtype=torch.uint8)
    scales = torch.zeros(n, k // 16, dtype=torch.float8_e4m3fn)
    for r in range(n):
        for b in range(k // 16):
            blk = wf[r, b * 16:(b + 1) * 16]
            s = blk.abs().max() / (torch.tensor(6.0) * gs)
            s = torch.tensor(1.0) if s == 0 else torch.clamp(s, max=448.0)
            s8 = s.to(torch.float8_e4m3fn)
            scales[r, b] = s8
            denom = s8.float() * gs
            for i in range(16):
                if denom == 0:
                    continue
                codes[r, b * 16 + i] = nearest_code_bruteforce(float(blk[i] / denom))
    packed = torch.zeros(n, k // 2, dtype=torch.uint8)
    for j in range(k // 2):
        packed[:, j] = codes[:, 2 * j] | (codes[:, 2 * j + 1] << 4)
    return packed, scales, gs


def assert_same_bits(a, b):
    assert a[0].dtype == b[0].dtype and torch.equal(a[0], b[0])
    assert torch.equal(a[1].view(torch.uint8), b[1].view(torch.uint8))
    assert torch.equal(a[2].view(torch.int32), b[2].view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_matches_bruteforce_on_random_data(dtype):
    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(5, 48, generator=gen) * torch.rand(5, 1, generator=gen) * 3).to(dtype)
    assert_same_bits(nvfp4.quantize_ref(w), quantize_bruteforce(w))


def test_codes_on_ties_and_saturation():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    # Ties go to the even code: 0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0.
    assert nvfp4.e2m1_codes_ref(ties).tolist() == [0, 2, 2, 4, 4, 6, 6]
    assert nvfp4.e2m1_codes_ref(-ties).tolist() == [8, 10, 10, 12, 12, 14, 14]
    assert nvfp4.e2m1_codes_ref(torch.tensor([6.0, 6.5, 1e30, -7.0])).tolist() == [7, 7, 7, 15]
    just_above = torch.nextafter(ties, torch.tensor(10.0))
    assert nvfp4.e2m1_codes_ref(just_above).tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert nvfp4.e2m1_codes_ref(torch.tensor([-0.0, -0.1, 0.0])).tolist() == [0, 8, 0]


def test_known_values_and_nibble_order():
    # amax 6 makes global scale 6/2688 and the block scale exactly 448, so q == w.
    row = torch.tensor([0.5, -1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -6.0,
                        0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.1])
    packed, scale, gs = nvfp4.quantize_ref(row[None])
    assert gs.shape == () and gs.item() == pytest.approx(6.0 / 2688.0)
    assert scale.float().item() == 448.0
    codes = [1, 10, 3, 4, 5, 6, 7, 15, 0, 2, 2, 4, 4, 6, 6, 8]
    assert packed[0].tolist() == [codes[2 * j] | (codes[2 * j + 1] << 4) for j in range(8)]
    back = nvfp4.dequantize_ref(packed, scale, gs, torch.float32)[0]
    expected = torch.tensor([0.5, -1, 1.5, 2, 3, 4, 6, -6, 0, 1, 1, 2, 2, 4, 4, -0.0])
    torch.testing.assert_close(back, expected, rtol=1e-6, atol=0)
    assert torch.signbit(back[-1])


def test_tie_values_through_quantize():
    # amax 2688 * 2**-10 makes the global scale 2**-10 and the block scale 448 exactly, so
    # q = w / (448 * 2**-10) lands exactly on the ties (0.25, ..., 5 times the scale).
    gen = torch.Generator().manual_seed(2)
    step = 448 * 2.0 ** -10
    base = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    perm = torch.randperm(16, generator=gen)
    w = (torch.cat([base, -base])[perm] * step)[None]
    packed, scale, gs = nvfp4.quantize_ref(w)
    assert gs.item() == 2.0 ** -10 and scale.float().item() == 448.0
    even = torch.tensor([0, 2, 2, 4, 4, 6, 6, 7])
    assert torch.equal(nvfp4.unpack_codes(packed)[0], torch.cat([even, even | 8])[perm].byte())
    assert_same_bits((packed, scale, gs), quantize_bruteforce(w))


def test_zero_blocks_all_zero_tensor_and_underflow():
    w = torch.zeros(3, 32)
    packed, scale, gs = nvfp4.quantize_ref(w)
    assert gs.item() == 1.0 and torch.all(scale.float() == 1.0) and torch.all(packed == 0)
    w = torch.zeros(2, 48)
    w[0, :16] = torch.linspace(-3, 3, 16)
    w[1, 16:32] = 1e6  # makes the global scale huge
    w[1, 32:48] = 1e-4  # block scale underflows to e4m3 zero -> codes 0
    w[1, 40] = -1e-4
    packed, scale, gs = nvfp4.quantize_ref(w)
    assert scale[0, 1].float().item() == 1.0 and torch.all(packed[0, 8:] == 0)
    assert scale[1, 2].float().item() == 0.0 and torch.all(packed[1, 16:] == 0)
    assert_same_bits((packed, scale, gs), quantize_bruteforce(w))
    assert torch.all(nvfp4.dequantize_ref(packed, scale, gs, torch.float32)[1, 32:] == 0)


def test_scale_rounding_can_saturate():
    # Block amax slightly above what the rounded-down e4m3 scale covers saturates to +-6.
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(64, 16, generator=gen)
    w[0, 0] = 1000.0
    assert_same_bits(nvfp4.quantize_ref(w), quantize_bruteforce(w))
    codes = nvfp4.unpack_codes(nvfp4.quantize_ref(w)[0])
    assert (codes & 7).max() == 7


def test_batch_dims_quantize_each_matrix_alone():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(3, 4, 32, generator=gen) * torch.tensor([1.0, 100.0, 0.01])[:, None, None]
    packed, scale, gs = nvfp4.quantize_ref(w)
    assert packed.shape == (3, 4, 16) and scale.shape == (3, 4, 2) and gs.shape == (3,)
    for e in range(3):
        assert_same_bits((packed[e], scale[e], gs[e]), nvfp4.quantize_ref(w[e]))
    back = nvfp4.dequantize_ref(packed, scale, gs, torch.float32)
    for e in range(3):
        torch.testing.assert_close(back[e], nvfp4.dequantize_ref(packed[e], scale[e], gs[e],
                                                                 torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_error_is_within_half_a_step(dtype):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(8, 64, generator=gen)
    packed, scale, gs = nvfp4.quantize(w)
    back = nvfp4.dequantize(packed, scale, gs, dtype)
    assert back.dtype == dtype
    step = (scale.float() * gs).repeat_interleave(16, dim=1)  # value of one E2M1 unit
    # Largest E2M1 gap is 2 units (4 -> 6); scale rounding adds at most 1/16 relative.
    err = (back.float() - w).abs()
    assert torch.all(err <= step * 1.0 + w.abs() * 2 ** -4 + 1e-6)
    assert err.mean() < 0.1 * w.abs().mean()


def test_dequantize_formula_independently():
    gen = torch.Generator().manual_seed(6)
    packed = torch.randint(0, 256, (3, 16), dtype=torch.uint8, generator=gen)
    scale = (torch.rand(3, 2, generator=gen) * 10).to(torch.float8_e4m3fn)
    gs = torch.tensor(0.37)
    out = nvfp4.dequantize_ref(packed, scale, gs, torch.float32)
    for r in range(3):
        for c in range(32):
            byte = int(packed[r, c // 2])
            code = byte & 0xF if c % 2 == 0 else byte >> 4
            mag = MAGNITUDES[code & 7] * (-1 if code & 8 else 1)
            expected = torch.tensor(mag) * (scale[r, c // 16].float() * gs)
            assert out[r, c].item() == expected.item()


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"\(4, 24\).*multiple of 16"):
        nvfp4.quantize(torch.randn(4, 24))
    with pytest.raises(ValueError, match="N, K"):
        nvfp4.quantize(torch.randn(32))
    with pytest.raises(ValueError, match="NaN"):
        nvfp4.quantize(torch.full((1, 16), float("nan")))
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        nvfp4.quantize(torch.ones(2, 16, dtype=torch.int32))
    packed, scale, gs = nvfp4.quantize(torch.randn(4, 32))
    with pytest.raises(ValueError, match="block_scale"):
        nvfp4.dequantize(packed, scale[:, :1], gs)
    with pytest.raises(ValueError, match="global_scale"):
        nvfp4.dequantize(packed, scale, gs.reshape(1))
