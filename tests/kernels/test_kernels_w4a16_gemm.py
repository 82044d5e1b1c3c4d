"""W4A16 NVFP4 GEMM (Triton) against its torch reference, and QuantLinear's triton backend."""

from __future__ import annotations

import pytest
import torch

from baton.kernels import QuantLinear, nvfp4, set_backend
from baton.kernels.w4a16_gemm import GemmConfig, gemm_config, w4a16_gemm, w4a16_gemm_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close(out, ref, dtype):
    scale = ref.float().abs().max().clamp(min=1.0)
    torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype] * scale)


def make(m, n, k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    bias = torch.randn(n, generator=gen).to(dtype).to(DEVICE)
    return x, nvfp4.quantize_ref(w.to(DEVICE)), bias


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,n,k", [(1, 24, 32), (5, 40, 48), (19, 72, 160)])
def test_matches_reference(m, n, k, dtype):
    x, (packed, scale, gs), bias = make(m, n, k, dtype, seed=m + n + k)
    out = w4a16_gemm(x, packed, scale, gs, bias)
    assert out.dtype == dtype and out.shape == (m, n)
    assert_close(out, w4a16_gemm_ref(x, packed, scale, gs, bias), dtype)
    assert_close(w4a16_gemm(x, packed, scale, gs), w4a16_gemm_ref(x, packed, scale, gs), dtype)


def test_split_k_and_tails_are_exact_in_bf16():
    # K tail (80 is not a multiple of 64), N and M tails, 3-way split: every path, same bits.
    x, (packed, scale, gs), bias = make(17, 20, 80, torch.bfloat16, seed=3)
    ref = w4a16_gemm_ref(x, packed, scale, gs, bias)
    for cfg in (GemmConfig(16, 16, 64), GemmConfig(16, 16, 32, split_k=3),
                GemmConfig(32, 32, 128)):
        out = w4a16_gemm(x, packed, scale, gs, bias, config=cfg)
        assert_close(out, ref, torch.bfloat16)
        assert torch.equal(out, w4a16_gemm(x, packed, scale, gs, bias, config=cfg))


def test_strided_input_and_empty_batch():
    x, (packed, scale, gs), _ = make(6, 16, 64, torch.bfloat16, seed=4)
    wide = torch.zeros(6, 128, dtype=torch.bfloat16, device=DEVICE)
    wide[:, ::2] = x
    assert_close(w4a16_gemm(wide[:, ::2], packed, scale, gs), w4a16_gemm_ref(x, packed, scale, gs),
                 torch.bfloat16)
    assert w4a16_gemm(x[:0], packed, scale, gs).shape == (0, 16)


def test_bad_inputs():
    x, (packed, scale, gs), _ = make(2, 16, 32, torch.bfloat16, seed=5)
    with pytest.raises(ValueError, match="K=32"):
        w4a16_gemm(x[:, :16], packed, scale, gs)
    with pytest.raises(ValueError, match="bias"):
        w4a16_gemm(x, packed, scale, gs, torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match="block_k"):
        GemmConfig(16, 16, 48)


def test_config_choice_on_cpu_is_bounded_by_the_problem():
    cfg = gemm_config(3, 40, 48, torch.device("cpu"))
    assert (cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k) == (16, 64, 64, 1)


@pytest.mark.parametrize("fmt", ["nvfp4", "w4a16_nvfp4", "fp8"])
def test_quant_linear_triton_backend_matches_torch(fmt):
    gen = torch.Generator().manual_seed(6)
    layer = QuantLinear.from_float(torch.randn(40, 64, generator=gen).to(DEVICE), fmt,
                                   bias=torch.randn(40, generator=gen).to(DEVICE))
    x = torch.randn(2, 3, 64, generator=gen).bfloat16().to(DEVICE)
    ref = layer(x)
    layer = set_backend(layer, "triton")
    assert layer.backend == ("torch" if fmt == "fp8" and DEVICE != "cuda" else "triton")
    out = layer(x)
    assert out.shape == (2, 3, 40) and out.dtype == torch.bfloat16
    if fmt == "fp8" and DEVICE == "cuda":  # W8A8: activations are quantized too
        torch.testing.assert_close(out.float(), ref.float(), rtol=0.1, atol=0.1)
    else:
        assert_close(out, ref, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 32, 128, 2048])
@pytest.mark.parametrize("n,k", [(2688, 1856), (1856, 2688), (1024, 4096)])
def test_gpu_real_shapes(m, n, k):
    x, (packed, scale, gs), bias = make(m, n, k, torch.bfloat16, seed=m)
    out = w4a16_gemm(x, packed, scale, gs, bias)
    assert_close(out, w4a16_gemm_ref(x, packed, scale, gs, bias), torch.bfloat16)
    assert torch.equal(out, w4a16_gemm(x, packed, scale, gs, bias))  # deterministic
