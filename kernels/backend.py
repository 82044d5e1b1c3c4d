"""Choosing the kernel backend of every quantized module in a model."""

from __future__ import annotations

from torch import nn

from baton.kernels.experts import QuantExperts
from baton.kernels.formats import BACKEND_CHOICES, check_backend
from baton.kernels.linear import QuantLinear


def auto_backend(module: QuantLinear | QuantExperts) -> str:
    """"triton" where a fast path beats the reference: quantized weights on CUDA, and expert
    stacks on CUDA in any format (the fused MoE kernel beats a per-expert torch loop); dense
    bf16 layers stay on the library GEMM, and everything on the CPU on torch."""
    weight = module.weight if isinstance(module, QuantLinear) else module.up_weight
    if not weight.is_cuda:
        return "torch"
    if isinstance(module, QuantExperts):
        return "triton"
    return "triton" if module.fmt.is_quantized else "torch"


def set_backend(module: nn.Module, kernels: str = "auto") -> nn.Module:
    """Sets the backend of every QuantLinear / QuantExperts under `module` (itself included).

    kernels: "torch" (the reference everywhere), "triton", or "auto" (see auto_backend).
    Returns `module`.
    """
    check_backend(kernels, field="kernels", choices=BACKEND_CHOICES)
    for sub in module.modules():
        if isinstance(sub, (QuantLinear, QuantExperts)):
            sub.set_backend(auto_backend(sub) if kernels == "auto" else kernels)
    return module
