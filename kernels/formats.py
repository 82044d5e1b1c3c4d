"""Weight storage formats a checkpoint can hold, and the kernel backends that run them."""

from __future__ import annotations

from enum import Enum

import torch


class WeightFormat(str, Enum):
    """How a linear layer's (or an expert stack's) weights are stored."""

    BF16 = "bf16"  # unquantized, stored in the model dtype (bf16, fp16 or fp32)
    FP8 = "fp8"  # float8_e4m3fn weights, fp32 weight scale, fp32 static input scale
    NVFP4 = "nvfp4"  # ModelOpt NVFP4: packed E2M1 codes, e4m3 block scales, fp32 global scale
    W4A16_NVFP4 = "w4a16_nvfp4"  # NVFP4 storage without an input scale (activations stay 16-bit)

    @classmethod
    def parse(cls, value: WeightFormat | str, field: str = "fmt") -> WeightFormat:
        """The format named by `value`; ValueError naming `field` when it is not one."""
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            allowed = ", ".join(f.value for f in cls)
            raise ValueError(
                f"{field}={value!r} is not a weight format; allowed: {allowed}"
            ) from None

    @property
    def is_quantized(self) -> bool:
        return self is not WeightFormat.BF16

    @property
    def is_nvfp4(self) -> bool:
        return self in (WeightFormat.NVFP4, WeightFormat.W4A16_NVFP4)


BACKENDS = ("torch", "triton")
BACKEND_CHOICES = ("auto", "torch", "triton")

# Model dtypes the modules accept for activations and unquantized weights.
MODEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_model_dtype(dtype: torch.dtype, field: str = "dtype") -> torch.dtype:
    if dtype not in MODEL_DTYPES:
        raise ValueError(
            f"{field}={dtype} is not a model dtype; allowed: bfloat16, float16, float32"
        )
    return dtype


def check_backend(value: str, field: str = "backend", choices=BACKENDS) -> str:
    if value not in choices:
        raise ValueError(f"{field}={value!r} is not allowed; allowed: {', '.join(choices)}")
    return value
