"""QuantLinear: linear layers whose tensors carry a checkpoint's names, one module per weight
format, and the kernel modules that replace them at load.

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

The modules, as gpt-fast's quantize.py swaps its linears: the model is built with the
storage module of each layer's format (`QuantLinear(k, n, fmt)` gives Bf16Linear, Fp8Linear
or Nvfp4Linear), whose forward is the torch reference: x @ dequantize(W).T with fp32
accumulation, output in x.dtype (NVFP4 runs W4A16: activations are not quantized). Once the
weights are in, set_backend(model, "triton") replaces each by the kernel module of its
format on its device, sharing the same tensors:
    fp8    -> Fp8ScaledMMLinear  W8A8 through torch._scaled_mm (CUDA sm89+, sm90+ per channel)
    nvfp4  -> Nvfp4W4A16Linear   the W4A16 Triton GEMM (Hopper and older, the interpreter)
           -> Nvfp4NativeLinear  FP4 tensor cores, activations quantized to NVFP4 (Blackwell,
                                 capability >= 10.0, shapes cuBLAS takes; blackwell.py)
    bf16   stays Bf16Linear      (the library GEMM is the fast path)
Each module's forward is one path: nothing is chosen per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from baton.kernels import blackwell, fp8, nvfp4, w4a16_gemm
from baton.kernels.formats import WeightFormat, check_backend, check_model_dtype


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class QuantLinear(nn.Module):
    """y = x @ W.T (+ bias) with W stored in `fmt`: the base of every linear module.
    Constructing QuantLinear itself builds the storage module of `fmt`."""

    formats: tuple[WeightFormat, ...] = ()
    backend = "torch"
    """The kernels this module runs: "torch" (the reference) or "triton" (a kernel module)."""

    def __new__(cls, in_features: int = 1, out_features: int = 1,
                fmt: WeightFormat | str = WeightFormat.BF16, *args, **kwargs):
        if cls is QuantLinear:
            cls = STORAGE[WeightFormat.parse(fmt)]
        return super().__new__(cls)

    def __init__(self, in_features: int, out_features: int,
                 fmt: WeightFormat | str = WeightFormat.BF16, dtype: torch.dtype = torch.bfloat16,
                 bias: bool = False, fp8_per_channel: bool = False,
                 device: torch.device | str | None = None):
        super().__init__()
        self.fmt = WeightFormat.parse(fmt)
        if self.fmt not in self.formats:
            raise ValueError(f"fmt={self.fmt.value!r}: {type(self).__name__} stores "
                             f"{', '.join(f.value for f in self.formats)}")
        self.dtype = check_model_dtype(dtype)
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"in_features={in_features}, out_features={out_features}: both must be >= 1"
            )
        if fp8_per_channel and self.fmt is not WeightFormat.FP8:
            raise ValueError(f"fp8_per_channel=True needs fmt='fp8', got fmt={self.fmt.value!r}")
        self.in_features, self.out_features = in_features, out_features
        self.fp8_per_channel = fp8_per_channel
        self._make_tensors(out_features, in_features, device)
        self.bias = _frozen(torch.zeros(out_features, dtype=dtype, device=device)) if bias \
            else None

    # ------------------------------------------------------------------ per format
    def _make_tensors(self, n: int, k: int, device) -> None:
        raise NotImplementedError

    def _load_float(self, weight: torch.Tensor, input_amax: float | None) -> None:
        """Quantizes float `weight` [N, K] into this module's tensors."""
        raise NotImplementedError

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [N, K] in `dtype`, as the reference math sees it."""
        raise NotImplementedError

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] (the module's one path)."""
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.dequantized_weight(torch.float32), bias).to(x.dtype)

    # ------------------------------------------------------------------ common
    @classmethod
    def from_float(cls, weight: torch.Tensor, fmt: WeightFormat | str = WeightFormat.BF16,
                   dtype: torch.dtype = torch.bfloat16, bias: torch.Tensor | None = None,
                   fp8_per_channel: bool = False, input_amax: float | None = None
                   ) -> QuantLinear:
        """Quantizes `weight` [N, K] into a new module on weight's device.

        input_amax (optional, calibration) sets input_scale: amax / 448 for fp8, amax /
        (6 * 448) for nvfp4; without it input_scale is 1.
        """
        if weight.dim() != 2:
            raise ValueError(f"weight must be [N, K], got {tuple(weight.shape)}")
        n, k = weight.shape
        layer = cls(k, n, fmt, dtype, bias=bias is not None, fp8_per_channel=fp8_per_channel,
                    device=weight.device)
        with torch.no_grad():
            layer._load_float(weight, input_amax)
            if bias is not None:
                if tuple(bias.shape) != (n,):
                    raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
                layer.bias.copy_(bias.to(dtype))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"x has shape {tuple(x.shape)}: last dim must be in_features={self.in_features}"
            )
        return self.matmul(x)

    def rebuilt_as(self, cls: type[QuantLinear]) -> QuantLinear:
        """The same layer as a `cls` module, holding this module's very tensors."""
        layer = cls(self.in_features, self.out_features, self.fmt, self.dtype,
                    bias=self.bias is not None, fp8_per_channel=self.fp8_per_channel,
                    device="meta")
        layer._parameters.update(self._parameters)
        layer._buffers.update(self._buffers)
        layer.prepare()
        return layer

    def prepare(self) -> None:
        """What a kernel module derives once from its loaded tensors (nothing by default)."""

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"fmt={self.fmt.value}, bias={self.bias is not None}, backend={self.backend}")


class Bf16Linear(QuantLinear):
    """Unquantized weights in the model dtype."""

    formats = (WeightFormat.BF16,)

    def _make_tensors(self, n, k, device):
        self.weight = _frozen(torch.zeros(n, k, dtype=self.dtype, device=device))

    def _load_float(self, weight, input_amax):
        self.weight.copy_(weight.to(self.dtype))

    def dequantized_weight(self, dtype=torch.float32):
        return self.weight.to(dtype)

    def matmul(self, x):
        if x.dtype == self.weight.dtype:
            # The library GEMM accumulates 16-bit products in fp32 already.
            return F.linear(x, self.weight, self.bias)
        return super().matmul(x)


class Fp8Linear(QuantLinear):
    """FP8 (e4m3) weights with a per-tensor or per-channel scale; the reference dequantizes."""

    formats = (WeightFormat.FP8,)

    def _make_tensors(self, n, k, device):
        f32 = dict(dtype=torch.float32, device=device)
        self.weight = _frozen(torch.zeros(n, k, dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("weight_scale", torch.ones(n if self.fp8_per_channel else (), **f32))
        if not self.fp8_per_channel:
            self.register_buffer("input_scale", torch.ones((), **f32))

    def _load_float(self, weight, input_amax):
        w, scale = fp8.quantize_fp8(weight, per_channel=self.fp8_per_channel)
        self.weight.copy_(w)
        self.weight_scale.copy_(scale)
        if input_amax is not None and not self.fp8_per_channel:
            self.input_scale.fill_(input_amax / fp8.E4M3_MAX)

    def dequantized_weight(self, dtype=torch.float32):
        return fp8.dequantize_fp8(self.weight, self.weight_scale, dtype)


class Nvfp4Linear(QuantLinear):
    """NVFP4 weights (ModelOpt layout), with an input scale (nvfp4) or without (w4a16_nvfp4);
    the reference dequantizes (W4A16)."""

    formats = (WeightFormat.NVFP4, WeightFormat.W4A16_NVFP4)

    def _make_tensors(self, n, k, device):
        if k % nvfp4.BLOCK_SIZE != 0:
            raise ValueError(
                f"in_features={k} must be a multiple of {nvfp4.BLOCK_SIZE} for {self.fmt.value}"
            )
        f32 = dict(dtype=torch.float32, device=device)
        self.weight = _frozen(torch.zeros(n, k // 2, dtype=torch.uint8, device=device))
        self.register_buffer(
            "weight_scale", torch.ones(n, k // nvfp4.BLOCK_SIZE, **f32).to(torch.float8_e4m3fn))
        self.register_buffer("weight_scale_2", torch.ones((), **f32))
        if self.fmt is WeightFormat.NVFP4:
            self.register_buffer("input_scale", torch.ones((), **f32))

    def _load_float(self, weight, input_amax):
        packed, block_scale, global_scale = nvfp4.quantize(weight)
        self.weight.copy_(packed)
        self.weight_scale.copy_(block_scale)
        self.weight_scale_2.copy_(global_scale)
        if input_amax is not None and self.fmt is WeightFormat.NVFP4:
            self.input_scale.fill_(input_amax / (nvfp4.FP4_MAX * nvfp4.E4M3_MAX))

    def dequantized_weight(self, dtype=torch.float32):
        return nvfp4.dequantize_ref(self.weight, self.weight_scale, self.weight_scale_2, dtype)


STORAGE: dict[WeightFormat, type[QuantLinear]] = {
    WeightFormat.BF16: Bf16Linear, WeightFormat.FP8: Fp8Linear,
    WeightFormat.NVFP4: Nvfp4Linear, WeightFormat.W4A16_NVFP4: Nvfp4Linear,
}


# ---------------------------------------------------------------------- kernel modules
def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.reshape(-1, k)


class Fp8ScaledMMLinear(Fp8Linear):
    """W8A8: activations quantized with the static (or per-token) scale, torch._scaled_mm."""

    backend = "triton"

    def matmul(self, x):
        out = fp8.fp8_linear_scaled_mm(_rows(x, self.in_features), self.weight,
                                       self.weight_scale, getattr(self, "input_scale", None),
                                       self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)


class Nvfp4W4A16Linear(Nvfp4Linear):
    """NVFP4 weights decoded in the Triton W4A16 GEMM, activations in 16 bits."""

    backend = "triton"

    def matmul(self, x):
        out = w4a16_gemm.nvfp4_linear(_rows(x, self.in_features), self.weight,
                                      self.weight_scale, self.weight_scale_2, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)


class Nvfp4NativeLinear(Nvfp4Linear):
    """W4A4 on FP4 tensor cores (Blackwell): activations quantized to NVFP4 per call, the
    weight's block scales kept in cuBLAS's swizzled layout (made once, at the swap)."""

    backend = "triton"

    def prepare(self):
        self.register_buffer("swizzled_weight_scale",
                             blackwell.swizzle_block_scales(self.weight_scale), persistent=False)

    def matmul(self, x):
        out = blackwell.nvfp4_linear_native(
            _rows(x, self.in_features), self.weight, self.weight_scale, self.weight_scale_2,
            getattr(self, "input_scale", None), self.bias, self.swizzled_weight_scale)
        return out.reshape(*x.shape[:-1], self.out_features)


def kernel_linear_class(layer: QuantLinear) -> type[QuantLinear]:
    """The module that runs `layer`'s format fastest on its weights' device."""
    weight = layer.weight
    if isinstance(layer, Fp8Linear):
        # The activations arrive on the weights' device: the check takes the weight for both.
        supported = fp8.scaled_mm_supported(weight, weight, layer.fp8_per_channel)
        return Fp8ScaledMMLinear if supported else Fp8Linear
    if isinstance(layer, Nvfp4Linear):
        path = blackwell.select_nvfp4_path(weight.device, layer.out_features,
                                           layer.in_features)
        return Nvfp4NativeLinear if path == "native_fp4" else Nvfp4W4A16Linear
    return STORAGE[layer.fmt]


def linear_for_backend(layer: QuantLinear, backend: str) -> QuantLinear:
    """`layer` as the module of `backend`: its storage module for "torch", its format's
    kernel module for "triton" (itself when it already is that module)."""
    check_backend(backend)
    cls = STORAGE[layer.fmt] if backend == "torch" else kernel_linear_class(layer)
    return layer if type(layer) is cls else layer.rebuilt_as(cls)
