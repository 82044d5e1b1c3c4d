"""Choosing the kernels of every quantized module in a model, once, at load.

Linear layers are swapped for their format's kernel module (QuantLinear's module docstring:
gpt-fast's quantize.py does the same with its linears): the module tree gets new objects
holding the same tensors, so use the module set_backend returns. Expert stacks keep their
object and take a compute path (QuantExperts.set_backend).
"""

from __future__ import annotations

from torch import nn

from baton.kernels.experts import QuantExperts
from baton.kernels.formats import BACKEND_CHOICES, check_backend
from baton.kernels.linear import QuantLinear, linear_for_backend


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
    """Every QuantLinear under `module` (itself included) replaced by the module of its
    backend, every QuantExperts set to it. kernels: "torch" (the reference everywhere),
    "triton", or "auto" (see auto_backend). Returns `module`, or what replaced it when it is
    itself a QuantLinear."""
    check_backend(kernels, field="kernels", choices=BACKEND_CHOICES)
    return _swap(module, kernels)


def _swap(module: nn.Module, kernels: str) -> nn.Module:
    if isinstance(module, QuantLinear):
        return linear_for_backend(module, auto_backend(module) if kernels == "auto" else kernels)
    if isinstance(module, QuantExperts):
        module.set_backend(auto_backend(module) if kernels == "auto" else kernels)
        return module
    for name, child in list(module.named_children()):
        replaced = _swap(child, kernels)
        if replaced is not child:
            setattr(module, name, replaced)
    return module
