"""NVFP4 weight quantization (ModelOpt convention): quantize and dequantize.

Shapes: `[..., N, K]`  N output rows, K input columns (K % 16 == 0); leading dims are a batch
(an expert stack `[E, N, K]` quantizes each expert with its own global scale).

Layout (what a ModelOpt NVFP4 checkpoint holds, and what every kernel here reads):

    packed       uint8          [..., N, K/2]   byte j of a row holds element 2j in its low
                                                nibble and element 2j+1 in its high nibble
    block_scale  float8_e4m3fn  [..., N, K/16]  one scale per 16 consecutive elements of a row
    global_scale float32        [...]           one per matrix (0-dim for a single [N, K])

    a nibble is an E2M1 code: bit 3 the sign, bits 0-2 the magnitude index into
    (0, 0.5, 1, 1.5, 2, 3, 4, 6); code 8 is negative zero.
    w[n, k] = e2m1(code[n, k]) * (float(block_scale[n, k // 16]) * global_scale)

Quantization, all in fp32 with correctly rounded operations:
    global_scale = amax(|w|) / (6 * 448), or 1 when that is 0 (an all-zero matrix)
    block_scale  = e4m3(min(block_amax / (6 * global_scale), 448)), the quotient replaced by 1
                   where it is 0; e4m3() rounds to nearest, ties to even
    q            = w / (float(block_scale) * global_scale), rounded to the nearest E2M1 value
                   with ties to even, saturating at +-6; the sign of a negative w is kept even
                   when q rounds to 0 (code 8); a block whose e4m3 scale underflowed to 0 gets
                   codes 0.
The division must be correctly rounded: an approximate fp32 division can be 1 ulp off and
flip a tie (the Triton kernel uses tl.div_rn).
"""

from __future__ import annotations

import torch

BLOCK_SIZE = 16  # elements per e4m3 block scale, along K
FP4_MAX = 6.0
E4M3_MAX = 448.0

# E2M1 magnitudes by code & 7.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Rounding thresholds between consecutive magnitudes, with the tie direction that makes ties
# go to the even code (0, 1, 2, 3, 4, 6 have mantissa bit 0 at codes 0, 2, 4, 6): a magnitude
# exactly on a threshold rounds up when `up_on_tie`.
_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False),
               (3.5, True), (5.0, False))


def _check_weight(w: torch.Tensor, field: str = "w") -> None:
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"{field} must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() < 2:
        raise ValueError(f"{field} must have shape [..., N, K], got {tuple(w.shape)}")
    if not w.is_floating_point() or w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"{field} must be bf16, fp16 or fp32, got {w.dtype}")
    if w.shape[-1] % BLOCK_SIZE != 0:
        raise ValueError(
            f"{field} has shape {tuple(w.shape)}: K={w.shape[-1]} must be a multiple of "
            f"{BLOCK_SIZE} for NVFP4"
        )


def check_packed(packed: torch.Tensor, block_scale: torch.Tensor,
                 global_scale: torch.Tensor) -> tuple[int, int]:
    """Validates an NVFP4 triple; returns (N, K)."""
    if packed.dtype != torch.uint8 or packed.dim() < 2:
        raise ValueError(
            f"packed must be uint8 [..., N, K/2], got {packed.dtype} {tuple(packed.shape)}"
        )
    n, k = packed.shape[-2], packed.shape[-1] * 2
    expected = (*packed.shape[:-1], k // BLOCK_SIZE)
    if block_scale.dtype != torch.float8_e4m3fn or tuple(block_scale.shape) != expected:
        raise ValueError(
            f"block_scale must be float8_e4m3fn {expected} for packed {tuple(packed.shape)}, "
            f"got {block_scale.dtype} {tuple(block_scale.shape)}"
        )
    if global_scale.dtype != torch.float32 or tuple(global_scale.shape) != tuple(
        packed.shape[:-2]
    ):
        raise ValueError(
            f"global_scale must be float32 {tuple(packed.shape[:-2])} for packed "
            f"{tuple(packed.shape)}, got {global_scale.dtype} {tuple(global_scale.shape)}"
        )
    if k % BLOCK_SIZE != 0:
        raise ValueError(f"packed {tuple(packed.shape)}: K={k} must be a multiple of {BLOCK_SIZE}")
    return n, k


def global_scale_ref(w: torch.Tensor) -> torch.Tensor:
    """amax / (6 * 448) per matrix (over the last two dims), 1 where that is 0."""
    amax = w.float().abs().amax(dim=(-2, -1))
    gs = amax / (FP4_MAX * E4M3_MAX)
    return torch.where(gs == 0, torch.ones_like(gs), gs)


def e2m1_codes_ref(q: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code (uint8 0..15) of fp32 `q`: ties to even, saturating, sign kept."""
    mag = q.abs()
    code = torch.zeros(q.shape, dtype=torch.uint8, device=q.device)
    for threshold, up_on_tie in _THRESHOLDS:
        code += (mag >= threshold) if up_on_tie else (mag > threshold)
    return code | ((q < 0).to(torch.uint8) << 3)


def quantize_ref(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-torch NVFP4 quantization; see the module docstring for the exact rules."""
    _check_weight(w)
    if not torch.isfinite(w).all():
        raise ValueError(
            f"w {tuple(w.shape)} holds NaN or infinite values; NVFP4 cannot store them"
        )
    *lead, n, k = w.shape
    x = w.float().reshape(*lead, n, k // BLOCK_SIZE, BLOCK_SIZE)
    gs = global_scale_ref(w)
    gs_b = gs.reshape(*lead, 1, 1)
    block_amax = x.abs().amax(dim=-1)
    scale = block_amax / (FP4_MAX * gs_b)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale).clamp(max=E4M3_MAX)
    block_scale = scale.to(torch.float8_e4m3fn)
    denom = (block_scale.float() * gs_b).unsqueeze(-1)
    codes = e2m1_codes_ref(x / denom)
    codes = torch.where(denom == 0, torch.zeros_like(codes), codes).reshape(*lead, n, k)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.contiguous(), block_scale, gs


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> E2M1 codes uint8 [..., K] (element 2j from the low nibble)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes -> fp32 values (code 8 gives -0.0)."""
    table = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=codes.device)
    mag = table[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


def dequantize_ref(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Pure-torch NVFP4 dequantization -> [..., N, K] in `dtype`."""
    n, k = check_packed(packed, block_scale, global_scale)
    lead = packed.shape[:-2]
    values = e2m1_values(unpack_codes(packed)).reshape(*lead, n, k // BLOCK_SIZE, BLOCK_SIZE)
    scale = block_scale.float() * global_scale.reshape(*lead, 1, 1)
    return (values * scale.unsqueeze(-1)).reshape(*lead, n, k).to(dtype)


def quantize(w: torch.Tensor, backend: str = "auto"):
    """NVFP4-quantizes `w` [..., N, K] (float, K % 16 == 0).

    Returns (packed uint8 [..., N, K/2], block_scale float8_e4m3fn [..., N, K/16],
    global_scale float32 [...]). backend: "torch" (reference), "triton", or "auto" (Triton
    on CUDA tensors). Both give the same bits.
    """
    return quantize_ref(w)


def dequantize(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
               dtype: torch.dtype = torch.bfloat16, backend: str = "auto") -> torch.Tensor:
    """NVFP4 triple -> [..., N, K] in `dtype` (w = e2m1 * (block_scale * global_scale))."""
    return dequantize_ref(packed, block_scale, global_scale, dtype)
