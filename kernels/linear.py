"""QuantLinear: a linear layer whose tensors carry a checkpoint's names, in any WeightFormat.

Shapes: `x [..., K] -> [..., N]`  K in_features, N out_features.

Tensors by format (exactly the checkpoint names, so a state_dict loads directly):
    bf16         weight [N, K] (model dtype)
    fp8          weight e4m3 [N, K], weight_scale fp32 [] (or [N] per channel),
                 input_scale fp32 [] (per-tensor only: per-channel checkpoints scale
                 activations per token and carry none)
    nvfp4        weight uint8 [N, K/2], weight_scale e4m3 [N, K/16], weight_scale_2 fp32 [],
                 input_scale fp32 []
    w4a16_nvfp4  as nvfp4 without input_scale
    every format: optional bias [N] (model dtype)

The "torch" backend is the reference: x @ dequantize(W).T with fp32 accumulation, output in
x.dtype (NVFP4 runs W4A16: activations are not quantized). The "triton" backend runs NVFP4
through the W4A16 Triton GEMM, or on Blackwell (capability >= 10.0) natively in FP4 with
activations quantized to NVFP4 (blackwell.py), and FP8 through torch._scaled_mm on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from baton.kernels import blackwell, fp8, nvfp4, w4a16_gemm
from baton.kernels.formats import WeightFormat, check_backend, check_model_dtype


class QuantLinear(nn.Module):
    """y = x @ W.T (+ bias) with W stored in `fmt`."""

    def __init__(self, in_features: int, out_features: int,
                 fmt: WeightFormat | str = WeightFormat.BF16, dtype: torch.dtype = torch.bfloat16,
                 bias: bool = False, fp8_per_channel: bool = False,
                 device: torch.device | str | None = None):
        super().__init__()
        self.fmt = WeightFormat.parse(fmt)
        self.dtype = check_model_dtype(dtype)
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"in_features={in_features}, out_features={out_features}: both must be >= 1"
            )
        if self.fmt.is_nvfp4 and in_features % nvfp4.BLOCK_SIZE != 0:
            raise ValueError(
                f"in_features={in_features} must be a multiple of {nvfp4.BLOCK_SIZE} for "
                f"{self.fmt.value}"
            )
        if fp8_per_channel and self.fmt is not WeightFormat.FP8:
            raise ValueError(f"fp8_per_channel=True needs fmt='fp8', got fmt={self.fmt.value!r}")
        self.in_features, self.out_features = in_features, out_features
        self.fp8_per_channel = fp8_per_channel
        self.backend = "torch"
        n, k = out_features, in_features
        f32 = dict(dtype=torch.float32, device=device)

        def frozen(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t, requires_grad=False)

        if self.fmt is WeightFormat.BF16:
            self.weight = frozen(torch.zeros(n, k, dtype=dtype, device=device))
        elif self.fmt is WeightFormat.FP8:
            self.weight = frozen(torch.zeros(n, k, dtype=torch.float8_e4m3fn, device=device))
            self.register_buffer("weight_scale", torch.ones(n if fp8_per_channel else (), **f32))
            if not fp8_per_channel:
                self.register_buffer("input_scale", torch.ones((), **f32))
        else:
            self.weight = frozen(torch.zeros(n, k // 2, dtype=torch.uint8, device=device))
            self.register_buffer(
                "weight_scale",
                torch.ones(n, k // nvfp4.BLOCK_SIZE, **f32).to(torch.float8_e4m3fn),
            )
            self.register_buffer("weight_scale_2", torch.ones((), **f32))
            if self.fmt is WeightFormat.NVFP4:
                self.register_buffer("input_scale", torch.ones((), **f32))
        self.bias = frozen(torch.zeros(n, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_float(cls, weight: torch.Tensor, fmt: WeightFormat | str = WeightFormat.BF16,
                   dtype: torch.dtype = torch.bfloat16, bias: torch.Tensor | None = None,
                   fp8_per_channel: bool = False, input_amax: float | None = None
                   ) -> QuantLinear:
        """Quantizes `weight` [N, K] into a new QuantLinear on weight's device.

        input_amax (optional, calibration) sets input_scale: amax / 448 for fp8, amax /
        (6 * 448) for nvfp4; without it input_scale is 1.
        """
        if weight.dim() != 2:
            raise ValueError(f"weight must be [N, K], got {tuple(weight.shape)}")
        n, k = weight.shape
        layer = cls(k, n, fmt, dtype, bias=bias is not None, fp8_per_channel=fp8_per_channel,
                    device=weight.device)
        with torch.no_grad():
            if layer.fmt is WeightFormat.BF16:
                layer.weight.copy_(weight.to(dtype))
            elif layer.fmt is WeightFormat.FP8:
                w, scale = fp8.quantize_fp8(weight, per_channel=fp8_per_channel)
                layer.weight.copy_(w)
                layer.weight_scale.copy_(scale)
                if input_amax is not None and not fp8_per_channel:
                    layer.input_scale.fill_(input_amax / fp8.E4M3_MAX)
            else:
                packed, block_scale, global_scale = nvfp4.quantize(weight)
                layer.weight.copy_(packed)
                layer.weight_scale.copy_(block_scale)
                layer.weight_scale_2.copy_(global_scale)
                if input_amax is not None and layer.fmt is WeightFormat.NVFP4:
                    layer.input_scale.fill_(input_amax / (nvfp4.FP4_MAX * nvfp4.E4M3_MAX))
            if bias is not None:
                if tuple(bias.shape) != (n,):
                    raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
                layer.bias.copy_(bias.to(dtype))
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [N, K] in `dtype`, as the reference math sees it."""
        if self.fmt is WeightFormat.BF16:
            return self.weight.to(dtype)
        if self.fmt is WeightFormat.FP8:
            return fp8.dequantize_fp8(self.weight, self.weight_scale, dtype)
        return nvfp4.dequantize_ref(self.weight, self.weight_scale, self.weight_scale_2, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"x has shape {tuple(x.shape)}: last dim must be in_features={self.in_features}"
            )
        if self.backend == "triton" and self.fmt.is_quantized:
            return self._forward_fast(x)
        return self._forward_ref(x)

    def _forward_ref(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt is WeightFormat.BF16 and x.dtype == self.weight.dtype:
            # The library GEMM accumulates 16-bit products in fp32 already.
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.dequantized_weight(torch.float32), bias).to(x.dtype)

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.fmt is WeightFormat.FP8:
            if not fp8.scaled_mm_supported(x2, self.weight, self.fp8_per_channel):
                return self._forward_ref(x)
            out = fp8.fp8_linear_scaled_mm(x2, self.weight, self.weight_scale,
                                           getattr(self, "input_scale", None), self.bias)
        elif blackwell.select_nvfp4_path(x2.device, self.out_features,
                                         self.in_features) == "native_fp4":
            out = blackwell.nvfp4_linear_native(
                x2, self.weight, self.weight_scale, self.weight_scale_2,
                getattr(self, "input_scale", None), self.bias, self._swizzled_weight_scale())
        else:
            out = w4a16_gemm.nvfp4_linear(x2, self.weight, self.weight_scale,
                                          self.weight_scale_2, self.bias)
        return out.reshape(*lead, self.out_features)

    def _swizzled_weight_scale(self) -> torch.Tensor:
        """The block scales in cuBLAS's layout, made once per loaded weight_scale."""
        key = (self.weight_scale.data_ptr(), self.weight_scale._version)
        cached = getattr(self, "_swizzle_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, blackwell.swizzle_block_scales(self.weight_scale))
            self._swizzle_cache = cached
        return cached[1]

    def set_backend(self, backend: str) -> None:
        self.backend = check_backend(backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"fmt={self.fmt.value}, bias={self.bias is not None}, backend={self.backend}")
