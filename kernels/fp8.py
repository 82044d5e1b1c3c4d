"""FP8 (float8_e4m3fn) weights with per-tensor or per-channel fp32 scales.

Shapes: `[..., N, K]`  N output rows, K input columns.

    weight        float8_e4m3fn [..., N, K]
    weight_scale  float32       [...] (per tensor) or [..., N] (per output channel)
    w[n, k] = float(weight[n, k]) * weight_scale (per tensor) or * weight_scale[n] (per channel)

The reference path multiplies 16-bit activations by the dequantized weight (fp32
accumulation). The CUDA path runs torch._scaled_mm (W8A8): activations are quantized to e4m3
with the checkpoint's static input_scale (per-tensor weights) or a dynamic per-token scale
(per-channel weights, the FP8_PER_CHANNEL_PER_TOKEN checkpoints carry no input_scale).
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0


def quantize_fp8(w: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] float -> (weight e4m3 [..., N, K], weight_scale fp32 [...] or [..., N]).

    scale = amax / 448 over the matrix (or each row), 1 where that is 0; weight = w / scale
    rounded to nearest e4m3.
    """
    if w.dim() < 2 or not w.is_floating_point():
        raise ValueError(f"w must be a float tensor [..., N, K], got {w.dtype} {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError(f"w {tuple(w.shape)} holds NaN or infinite values; FP8 cannot store them")
    x = w.float()
    amax = x.abs().amax(dim=-1) if per_channel else x.abs().amax(dim=(-2, -1))
    scale = amax / E4M3_MAX
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    denom = scale.unsqueeze(-1) if per_channel else scale.reshape(*scale.shape, 1, 1)
    weight = (x / denom).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return weight, scale


def dequantize_fp8(weight: torch.Tensor, weight_scale: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(weight e4m3 [..., N, K], scale [...] or [..., N]) -> [..., N, K] in `dtype`."""
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"weight must be float8_e4m3fn, got {weight.dtype}")
    lead, n = weight.shape[:-2], weight.shape[-2]
    if tuple(weight_scale.shape) == tuple(lead):
        scale = weight_scale.reshape(*lead, 1, 1)
    elif tuple(weight_scale.shape) == (*lead, n):
        scale = weight_scale.unsqueeze(-1)
    else:
        raise ValueError(
            f"weight_scale {tuple(weight_scale.shape)} fits neither per-tensor {tuple(lead)} nor "
            f"per-channel {(*lead, n)} for weight {tuple(weight.shape)}"
        )
    return (weight.float() * scale.float()).to(dtype)


def quantize_activations(x: torch.Tensor, input_scale: torch.Tensor | None):
    """x [M, K] -> (e4m3 [M, K], fp32 scale): static per-tensor with `input_scale`, else a
    dynamic per-row scale [M, 1] = row amax / 448 (1 for an all-zero row)."""
    xf = x.float()
    if input_scale is None:
        scale = xf.abs().amax(dim=-1, keepdim=True) / E4M3_MAX
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    else:
        scale = input_scale.float()
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def fp8_linear_scaled_mm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         input_scale: torch.Tensor | None, bias: torch.Tensor | None
                         ) -> torch.Tensor:
    """W8A8 x [M, K] @ weight[N, K].T through torch._scaled_mm (CUDA, sm89+) -> [M, N] x.dtype.

    Per-tensor weight scale with a static input_scale uses tensor-wise scaling; a per-channel
    weight scale uses row-wise scaling (per-token activation scale [M, 1], weight [1, N]).
    """
    xq, a_scale = quantize_activations(x, input_scale)
    if weight_scale.dim() == 0 and input_scale is not None:
        out = torch._scaled_mm(xq, weight.t(), scale_a=a_scale.reshape(()),
                               scale_b=weight_scale.float().reshape(()), out_dtype=x.dtype)
    else:
        n = weight.shape[0]
        b_scale = weight_scale.float().expand(n) if weight_scale.dim() == 0 else weight_scale
        if input_scale is not None:
            a_scale = a_scale.reshape(1, 1).expand(x.shape[0], 1)
        # Row-wise scaling is implemented for bf16 output only.
        out = torch._scaled_mm(xq, weight.t(), scale_a=a_scale.float().contiguous(),
                               scale_b=b_scale.float().reshape(1, n).contiguous(),
                               out_dtype=torch.bfloat16).to(x.dtype)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out


def scaled_mm_supported(x: torch.Tensor, weight: torch.Tensor, per_channel: bool) -> bool:
    """torch._scaled_mm wants CUDA sm89+ (row-wise scaling sm90+), K and N multiples of 16."""
    if not (x.is_cuda and weight.is_cuda):
        return False
    needed = (9, 0) if per_channel else (8, 9)
    return (torch.cuda.get_device_capability(x.device) >= needed
            and weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0)
