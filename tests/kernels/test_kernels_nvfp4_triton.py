"""Triton NVFP4 quantize/dequantize: the same bits as the torch reference (CPU interpreter at
small shapes; the GPU at real shapes)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from baton.kernels import nvfp4
from baton.kernels.triton_common import (
    INTERPRET,
    e2m1_pair_to_f32_scaled,
    e2m1_to_f32,
    f32_to_e4m3_positive,
    to_dtype_rn,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_same_bits(a, b):
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1].view(torch.uint8), b[1].view(torch.uint8))
    assert torch.equal(a[2].view(torch.int32), b[2].view(torch.int32))


def check_both_ways(w):
    ref = nvfp4.quantize_ref(w)
    got = nvfp4.quantize(w, backend="triton")
    assert_same_bits(got, ref)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a = nvfp4.dequantize(*ref, dtype, backend="torch")
        b = nvfp4.dequantize(*ref, dtype, backend="triton")
        assert a.dtype == b.dtype == dtype
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5, 48), (3, 7, 32), (1, 16)])
def test_random_data_bit_exact(dtype, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=gen) * torch.logspace(-2, 2, shape[-2])[:, None]
    check_both_ways(w.to(dtype).to(DEVICE))


def test_ties_saturation_zero_blocks_negative_zero_and_underflow():
    # amax 2688 * 2**-10 makes the global scale 2**-10 and the block scale 448 exactly, so
    # q = w / 0.4375 lands exactly on every tie.
    unit = 0.4375
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    w = torch.stack([
        torch.cat([ties, -ties]) * unit,
        torch.cat([torch.full((8,), -1e-3), torch.full((8,), 6.0 * unit)]),  # code 8
        torch.zeros(16),  # all-zero block
        torch.full((16,), 1e-9),  # its block scale underflows to e4m3 zero
    ]).reshape(2, 32)
    check_both_ways(w.to(DEVICE))
    codes = nvfp4.unpack_codes(nvfp4.quantize(w.to(DEVICE), backend="triton")[0]).cpu()
    even = [0, 2, 2, 4, 4, 6, 6, 7]
    assert codes[0, :16].tolist() == even + [c | 8 for c in even]
    assert codes[0, 16:24].tolist() == [8] * 8
    assert torch.all(codes[1] == 0)
    saturating = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    saturating[0, 0] = 1000.0  # rounding of the e4m3 scale pushes some |q| past 6
    check_both_ways(saturating.to(DEVICE))
    check_both_ways(torch.zeros(4, 64, device=DEVICE))  # all-zero tensor


@triton.jit
def _e4m3_kernel(x_ptr, code_ptr, val_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    code, val = f32_to_e4m3_positive(tl.load(x_ptr + offs, mask=mask, other=1.0))
    tl.store(code_ptr + offs, code.to(tl.uint8), mask=mask)
    tl.store(val_ptr + offs, val, mask=mask)


def test_e4m3_rounding_matches_torch_cast_on_every_value_and_midpoint():
    grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (grid[1:] + grid[:-1]) / 2  # exact in fp32: the ties
    x = torch.cat([grid, mids, torch.nextafter(mids, torch.zeros(())),
                   torch.nextafter(mids, torch.full((), 500.0)),
                   torch.rand(300, generator=torch.Generator().manual_seed(0)) * 448,
                   torch.tensor([1e-30, 2.0 ** -10, 2.0 ** -10 * 1.0001])]).to(DEVICE)
    code = torch.empty(x.shape, dtype=torch.uint8, device=DEVICE)
    val = torch.empty_like(x)
    _e4m3_kernel[(triton.cdiv(x.numel(), 128),)](x, code, val, x.numel(), BLOCK=128)
    expected = x.to(torch.float8_e4m3fn)
    assert torch.equal(code, expected.view(torch.uint8))
    assert torch.equal(val, expected.float())


@triton.jit
def _bf16_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = to_dtype_rn(tl.load(x_ptr + offs, mask=mask, other=0.0), tl.bfloat16, INTERPRETED)
    tl.store(y_ptr + offs, y, mask=mask)


def test_bf16_rounding_is_to_nearest_even():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(200, generator=gen).bfloat16()
    up = torch.nextafter(base, torch.full((), float("inf"), dtype=torch.bfloat16))
    mids = (base.float() + up.float()) / 2
    x = torch.cat([torch.randn(300, generator=gen), mids, -mids]).to(DEVICE)
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    _bf16_kernel[(triton.cdiv(x.numel(), 128),)](x, y, x.numel(), BLOCK=128,
                                                INTERPRETED=INTERPRET)
    assert torch.equal(y.view(torch.int16), x.bfloat16().view(torch.int16))


def test_auto_backend_follows_the_device():
    w = torch.randn(4, 32)
    assert_same_bits(nvfp4.quantize(w), nvfp4.quantize(w, backend="torch"))
    with pytest.raises(ValueError, match="backend='cuda'"):
        nvfp4.quantize(w, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2688, 1856), (128, 1856, 2688), (4096, 1024)])
def test_gpu_real_shapes_bit_exact(shape):
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16)
    assert_same_bits(nvfp4.quantize(w, backend="triton"), nvfp4.quantize_ref(w))
    triple = nvfp4.quantize_ref(w)
    assert torch.equal(nvfp4.dequantize(*triple, backend="triton").view(torch.int16),
                       nvfp4.dequantize_ref(*triple).view(torch.int16))


def test_given_global_scale_saturates_the_same_way():
    # A calibrated activation scale smaller than amax / 2688: large values saturate at +-6.
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(7)).to(DEVICE) * 10
    gs = torch.tensor(0.002, device=DEVICE)
    ref = nvfp4.quantize(x, backend="torch", global_scale=gs, check_finite=False)
    assert_same_bits(nvfp4.quantize(x, backend="triton", global_scale=gs), ref)
    assert ref[2].item() == pytest.approx(0.002)
    assert (nvfp4.unpack_codes(ref[0]) & 7).max() == 7
    with pytest.raises(ValueError, match="global_scale must be float32"):
        nvfp4.quantize(x, global_scale=torch.tensor([0.1]))


@triton.jit
def _decode_kernel(byte_ptr, lo_ptr, hi_ptr, lo2_ptr, hi2_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    byte = tl.load(byte_ptr + offs).to(tl.int32)
    lo, hi = e2m1_pair_to_f32_scaled(byte)
    tl.store(lo_ptr + offs, lo)
    tl.store(hi_ptr + offs, hi)
    tl.store(lo2_ptr + offs, e2m1_to_f32(byte & 15))
    tl.store(hi2_ptr + offs, e2m1_to_f32(byte >> 4))


def test_e2m1_decoders_on_every_byte():
    byte = torch.arange(256, dtype=torch.uint8, device=DEVICE)
    outs = [torch.empty(256, device=DEVICE) for _ in range(4)]
    _decode_kernel[(1,)](byte, *outs, BLOCK=256)
    codes = nvfp4.unpack_codes(byte.cpu()[:, None])
    expected = nvfp4.e2m1_values(codes)  # [256, 2]: low nibble, high nibble
    lo, hi, lo2, hi2 = (o.cpu() for o in outs)
    for got, want in ((lo * 16384, expected[:, 0]), (hi * 16384, expected[:, 1]),
                      (lo2, expected[:, 0]), (hi2, expected[:, 1])):
        assert torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want))
