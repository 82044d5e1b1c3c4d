"""The Blackwell native-FP4 path: its scale layout, its data flow (with cuBLAS's GEMM
emulated on the CPU), and its dispatch by device capability (faked here)."""

from __future__ import annotations

import pytest
import torch

from baton.kernels import QuantLinear, blackwell, nvfp4, set_backend
from baton.kernels.linear import Nvfp4NativeLinear


def to_blocked(scale: torch.Tensor) -> torch.Tensor:
    """The layout as torch's own scaled-mm tests build it (cuBLAS docs, "1D block scaling
    factors layout"): a second, differently written implementation."""
    rows, cols = scale.shape
    n_row_blocks, n_col_blocks = -(-rows // 128), -(-cols // 4)
    padded = torch.zeros(n_row_blocks * 128, n_col_blocks * 4, dtype=scale.dtype)
    padded[:rows, :cols] = scale
    blocks = padded.view(n_row_blocks, 128, n_col_blocks, 4).permute(0, 2, 1, 3)
    return blocks.reshape(-1, 4, 32, 4).transpose(1, 2).reshape(-1, 32, 16).flatten()


def random_scales(rows, cols, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, 127, (rows, cols), dtype=torch.uint8, generator=gen).view(
        torch.float8_e4m3fn)


@pytest.mark.parametrize("rows,cols", [(5, 3), (130, 9), (256, 8), (128, 4)])
def test_swizzle_layout(rows, cols):
    scale = random_scales(rows, cols, seed=rows)
    flat = blackwell.swizzle_block_scales(scale)
    # Against torch's own test helper for the cuBLAS layout ...
    assert torch.equal(flat.view(torch.uint8), to_blocked(scale.view(torch.uint8)))
    # ... and the per-element formula, including the zero padding.
    expected = torch.zeros(flat.numel(), dtype=torch.uint8)
    for r in range(rows):
        for c in range(cols):
            expected[blackwell.swizzled_offset(r, c, cols)] = scale[r, c].view(torch.uint8)
    assert torch.equal(flat.view(torch.uint8), expected)
    back = blackwell.unswizzle_block_scales(flat, rows, cols)
    assert torch.equal(back.view(torch.uint8), scale.view(torch.uint8))


def test_swizzle_rejects_bad_shapes():
    with pytest.raises(ValueError, match="R, C"):
        blackwell.swizzle_block_scales(random_scales(4, 4).flatten())
    with pytest.raises(ValueError, match="swizzles to 512"):
        blackwell.unswizzle_block_scales(torch.zeros(100, dtype=torch.float8_e4m3fn), 5, 3)


def test_dispatch_by_faked_capability(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(blackwell, "device_capability", lambda device: (10, 0))
    assert blackwell.select_nvfp4_path(cuda, 64, 64) == "native_fp4"
    assert blackwell.select_nvfp4_path(cuda, 64, 48) == "w4a16"  # K/2 bytes not 16-aligned
    assert blackwell.select_nvfp4_path(torch.device("cpu"), 64, 64) == "w4a16"
    monkeypatch.setattr(blackwell, "device_capability", lambda device: (9, 0))
    assert blackwell.select_nvfp4_path(cuda, 64, 64) == "w4a16"
    monkeypatch.setattr(blackwell, "device_capability", lambda device: (12, 0))
    assert blackwell.select_nvfp4_path(cuda, 64, 64) == "native_fp4"


def w4a4_expected(x, packed, scale, gs, x_gs, bias=None):
    """x and W both through NVFP4, multiplied exactly."""
    x_dq = nvfp4.dequantize_ref(*nvfp4.quantize_ref(x, global_scale=x_gs), torch.float64)
    w_dq = nvfp4.dequantize_ref(packed, scale, gs, torch.float64)
    out = x_dq @ w_dq.T
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("input_scale", [None, 0.004])
def test_native_data_flow_with_emulated_gemm(input_scale):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(136, 64, generator=gen)  # 136 rows: two row tiles, the second padded
    x = torch.randn(9, 64, generator=gen).bfloat16()
    bias = torch.randn(136, generator=gen).bfloat16()
    packed, scale, gs = nvfp4.quantize_ref(w)
    in_scale = None if input_scale is None else torch.tensor(input_scale)
    out = blackwell.nvfp4_linear_native(x, packed, scale, gs, in_scale, bias,
                                        scaled_mm=blackwell.scaled_mm_emulated)
    x_gs = nvfp4.global_scale_ref(x) if in_scale is None else in_scale
    expected = w4a4_expected(x, packed, scale, gs, x_gs, bias)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max())
    # W4A4 stays near the W4A16 reference.
    ref = QuantLinear.from_float(w, "nvfp4", bias=bias)(x)
    assert (out.float() - ref.float()).norm() / ref.float().norm() < 0.15


@pytest.mark.parametrize("fmt", ["nvfp4", "w4a16_nvfp4"])
def test_quant_linear_takes_the_native_path_on_blackwell(monkeypatch, fmt):
    calls = []

    def fake_scaled_mm(*args, **kwargs):
        calls.append(args[0].dtype)
        return blackwell.scaled_mm_emulated(*args, **kwargs)

    monkeypatch.setattr(blackwell, "select_nvfp4_path", lambda device, n, k: "native_fp4")
    monkeypatch.setattr(torch, "_scaled_mm", fake_scaled_mm)
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(32, 64, generator=gen)
    layer = QuantLinear.from_float(w, fmt, input_amax=8.0)
    x = torch.randn(2, 3, 64, generator=gen).bfloat16()
    layer = set_backend(layer, "triton")
    assert isinstance(layer, Nvfp4NativeLinear) and layer.backend == "triton"
    out = layer(x)
    assert calls == [torch.float4_e2m1fn_x2] and out.shape == (2, 3, 32)
    x_gs = (layer.input_scale if fmt == "nvfp4" else nvfp4.global_scale_ref(x.reshape(6, 64)))
    expected = w4a4_expected(x.reshape(6, 64), layer.weight, layer.weight_scale,
                             layer.weight_scale_2, x_gs)
    torch.testing.assert_close(out.reshape(6, 32).double(), expected, rtol=2e-2,
                               atol=2e-2 * expected.abs().max())
    # The swizzled weight scales are made once, at the swap, and reused by every call.
    swizzled = layer.swizzled_weight_scale
    assert torch.equal(swizzled, blackwell.swizzle_block_scales(layer.weight_scale))
    layer(x)
    assert layer.swizzled_weight_scale is swizzled
    assert "swizzled_weight_scale" not in layer.state_dict()


@pytest.mark.gpu
def test_gpu_native_fp4_matches_emulation():
    if blackwell.select_nvfp4_path(torch.device("cuda"), 256, 256) != "native_fp4":
        pytest.skip("needs a GPU with FP4 tensor cores (compute capability >= 10.0)")
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(2688, 1856, device="cuda", generator=gen)
    x = torch.randn(64, 1856, device="cuda", generator=gen).bfloat16()
    packed, scale, gs = nvfp4.quantize(w)
    out = blackwell.nvfp4_linear_native(x, packed, scale, gs, None)
    emulated = blackwell.nvfp4_linear_native(x, packed, scale, gs, None,
                                             scaled_mm=blackwell.scaled_mm_emulated)
    torch.testing.assert_close(out.float(), emulated.float(), rtol=2e-2, atol=2e-2)
