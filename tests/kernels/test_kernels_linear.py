"""QuantLinear: checkpoint tensor names, loading, reference math, backends."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from baton.kernels import QuantLinear, WeightFormat, fp8, nvfp4, set_backend
from baton.kernels.linear import (
    Bf16Linear,
    Fp8Linear,
    Nvfp4Linear,
    Nvfp4W4A16Linear,
)

E4M3 = torch.float8_e4m3fn

EXPECTED = {
    "bf16": {"weight": (torch.bfloat16, (24, 32))},
    "fp8": {"weight": (E4M3, (24, 32)), "weight_scale": (torch.float32, ()),
            "input_scale": (torch.float32, ())},
    "nvfp4": {"weight": (torch.uint8, (24, 16)), "weight_scale": (E4M3, (24, 2)),
              "weight_scale_2": (torch.float32, ()), "input_scale": (torch.float32, ())},
    "w4a16_nvfp4": {"weight": (torch.uint8, (24, 16)), "weight_scale": (E4M3, (24, 2)),
                    "weight_scale_2": (torch.float32, ())},
}


@pytest.mark.parametrize("fmt", list(EXPECTED))
def test_state_dict_carries_checkpoint_names(fmt):
    layer = QuantLinear(32, 24, fmt)
    got = {k: (v.dtype, tuple(v.shape)) for k, v in layer.state_dict().items()}
    assert got == EXPECTED[fmt]
    with_bias = QuantLinear(32, 24, fmt, bias=True).state_dict()
    assert with_bias["bias"].shape == (24,) and with_bias["bias"].dtype == torch.bfloat16


def test_fp8_per_channel_names():
    got = {k: (v.dtype, tuple(v.shape))
           for k, v in QuantLinear(32, 24, "fp8", fp8_per_channel=True).state_dict().items()}
    assert got == {"weight": (E4M3, (24, 32)), "weight_scale": (torch.float32, (24,))}


@pytest.mark.parametrize("fmt", ["nvfp4", "w4a16_nvfp4", "fp8"])
def test_checkpoint_state_dict_loads_and_computes_x_times_dequantized_w(fmt):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 32, generator=gen)
    bias = torch.randn(24, generator=gen)
    # A checkpoint as a producer writes it, built without QuantLinear.
    if fmt == "fp8":
        scale = w.abs().max() / 448
        ckpt = {"weight": (w / scale).to(E4M3), "weight_scale": scale,
                "input_scale": torch.tensor(0.01)}
        dense = ckpt["weight"].float() * scale
    else:
        packed, block_scale, gs = nvfp4.quantize_ref(w)
        ckpt = {"weight": packed, "weight_scale": block_scale, "weight_scale_2": gs}
        if fmt == "nvfp4":
            ckpt["input_scale"] = torch.tensor(0.02)
        dense = nvfp4.dequantize_ref(packed, block_scale, gs, torch.float32)
    ckpt["bias"] = bias.bfloat16()
    layer = QuantLinear(32, 24, fmt, bias=True)
    layer.load_state_dict(ckpt, strict=True)
    x = torch.randn(2, 3, 32, generator=gen).bfloat16()
    y = layer(x)
    assert y.shape == (2, 3, 24) and y.dtype == torch.bfloat16
    expected = (x.double() @ dense.double().T + bias.bfloat16().double()).bfloat16()
    torch.testing.assert_close(y, expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bf16_format_matches_dense_linear(dtype):
    gen = torch.Generator().manual_seed(1)
    w, b = torch.randn(20, 40, generator=gen), torch.randn(20, generator=gen)
    layer = QuantLinear.from_float(w, "bf16", dtype, bias=b)
    x = torch.randn(5, 40, generator=gen).to(dtype)
    ref = nn.functional.linear(x.double(), w.to(dtype).double(), b.to(dtype).double())
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(layer(x).double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("fmt,rel", [("fp8", 0.06), ("nvfp4", 0.2), ("w4a16_nvfp4", 0.2)])
def test_from_float_approximates_the_float_layer(fmt, rel):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(64, 128, generator=gen)
    layer = QuantLinear.from_float(w, fmt, torch.float32)
    x = torch.randn(16, 128, generator=gen)
    err = (layer(x) - x @ w.T).norm() / (x @ w.T).norm()
    assert err < rel


def test_from_float_per_channel_fp8_and_input_amax():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(8, 16, generator=gen) * torch.logspace(-3, 3, 8)[:, None]
    per_channel = QuantLinear.from_float(w, "fp8", torch.float32, fp8_per_channel=True)
    torch.testing.assert_close(per_channel.weight_scale, w.abs().amax(1) / 448)
    x = torch.randn(4, 16, generator=gen)
    # e4m3 keeps 3 mantissa bits: each weight is off by at most 2**-4 of itself.
    bound = x.abs() @ w.abs().T * 2 ** -4 + 1e-6
    assert torch.all((per_channel(x) - x @ w.T).abs() <= bound)
    layer = QuantLinear.from_float(w, "nvfp4", input_amax=26.88)
    assert layer.input_scale.item() == pytest.approx(0.01)


def linears(model):
    return [type(m) for m in model.modules() if isinstance(m, QuantLinear)]


def test_quant_linear_builds_the_storage_module_of_its_format():
    assert [type(QuantLinear(32, 16, f)) for f in ("bf16", "fp8", "nvfp4", "w4a16_nvfp4")] == [
        Bf16Linear, Fp8Linear, Nvfp4Linear, Nvfp4Linear]
    assert type(QuantLinear.from_float(torch.randn(8, 32), "fp8")) is Fp8Linear
    assert all(QuantLinear(32, 16, f).backend == "torch" for f in EXPECTED)
    with pytest.raises(ValueError, match="Fp8Linear stores fp8"):
        Fp8Linear(32, 16, "bf16")


def test_set_backend_swaps_in_each_formats_module_sharing_its_tensors():
    model = nn.Sequential(QuantLinear(32, 16, "nvfp4"), nn.ReLU(),
                          nn.Sequential(QuantLinear(16, 16, "bf16")),
                          QuantLinear(32, 16, "fp8"))
    weight = model[0].weight
    assert set_backend(model, "triton") is model
    # On the CPU: NVFP4 takes the Triton W4A16 GEMM (the interpreter), bf16 keeps the library
    # GEMM, FP8 has no _scaled_mm here and keeps its reference module.
    assert linears(model) == [Nvfp4W4A16Linear, Bf16Linear, Fp8Linear]
    assert model[0].backend == "triton" and model[0].weight is weight
    assert model[0].state_dict().keys() == QuantLinear(32, 16, "nvfp4").state_dict().keys()
    set_backend(model, "auto")
    assert linears(model) == [Nvfp4Linear, Bf16Linear, Fp8Linear]
    assert model[0].weight is weight
    bare = QuantLinear(32, 16, "nvfp4")
    assert type(set_backend(bare, "triton")) is Nvfp4W4A16Linear and type(bare) is Nvfp4Linear
    with pytest.raises(ValueError, match="kernels='cuda'"):
        set_backend(model, "cuda")


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="fmt='int4'"):
        QuantLinear(32, 16, "int4")
    with pytest.raises(ValueError, match="in_features=24"):
        QuantLinear(24, 16, WeightFormat.NVFP4)
    with pytest.raises(ValueError, match="fp8_per_channel"):
        QuantLinear(32, 16, "bf16", fp8_per_channel=True)
    with pytest.raises(ValueError, match="dtype=torch.int8"):
        QuantLinear(32, 16, "bf16", dtype=torch.int8)
    with pytest.raises(ValueError, match="in_features=32"):
        QuantLinear(32, 16)(torch.zeros(2, 31, dtype=torch.bfloat16))


@pytest.mark.parametrize("per_channel", [False, True])
def test_fp8_scaled_mm_path_computes_w8a8(per_channel):
    # torch._scaled_mm also runs on the CPU: the CUDA path's data flow checked against an
    # exact W8A8 emulation (activations through e4m3 with the static or per-token scale).
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(32, 64, generator=gen)
    x = torch.randn(5, 64, generator=gen).bfloat16()
    bias = torch.randn(32, generator=gen).bfloat16()
    q, scale = fp8.quantize_fp8(w, per_channel=per_channel)
    input_scale = None if per_channel else torch.tensor(0.02)
    out = fp8.fp8_linear_scaled_mm(x, q, scale, input_scale, bias)
    xq, x_scale = fp8.quantize_activations(x, input_scale)
    expected = (xq.double() * x_scale.double()) @ fp8.dequantize_fp8(q, scale, torch.float64).T
    expected += bias.double()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2)
    if not per_channel:  # values beyond 448 * input_scale saturate
        assert fp8.quantize_activations(torch.tensor([[100.0]]), input_scale)[0].float() == 448
