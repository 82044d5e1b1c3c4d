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
import triton
import triton.language as tl

from baton.kernels.triton_common import (
    INTERPRET,
    check_triton_device,
    e2m1_to_f32,
    e4m3_to_f32,
    f32_to_e2m1,
    f32_to_e4m3_positive,
    to_dtype_rn,
)

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


# The kernels see any [..., N, K] tensor as rows of 16-element blocks: K % 16 == 0, so a
# block never straddles two rows, and block r of the flattened tensor belongs to matrix
# r // blocks_per_matrix (whose global scale it uses).


@triton.jit
def _quantize_kernel(
    # pointers
    w_ptr, packed_ptr, scale_ptr, global_scale_ptr,
    # sizes
    num_blocks, blocks_per_matrix,
    # meta-parameters
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = rows < num_blocks
    pairs = tl.arange(0, 8)
    base = rows[:, None] * 16 + pairs[None, :] * 2
    even = tl.load(w_ptr + base, mask=mask[:, None], other=0.0).to(tl.float32)
    odd = tl.load(w_ptr + base + 1, mask=mask[:, None], other=0.0).to(tl.float32)
    gs = tl.load(global_scale_ptr + rows // blocks_per_matrix, mask=mask, other=1.0)

    block_amax = tl.maximum(tl.max(tl.abs(even), axis=1), tl.max(tl.abs(odd), axis=1))
    scale = tl.div_rn(block_amax, 6.0 * gs)
    scale = tl.minimum(tl.where(scale == 0.0, 1.0, scale), 448.0)
    scale_code, scale_val = f32_to_e4m3_positive(scale)
    denom = (scale_val * gs)[:, None]
    safe = tl.where(denom == 0.0, 1.0, denom)
    code_even = tl.where(denom == 0.0, 0, f32_to_e2m1(tl.div_rn(even, safe)))
    code_odd = tl.where(denom == 0.0, 0, f32_to_e2m1(tl.div_rn(odd, safe)))

    tl.store(packed_ptr + rows[:, None] * 8 + pairs[None, :],
             (code_even | (code_odd << 4)).to(tl.uint8), mask=mask[:, None])
    tl.store(scale_ptr + rows, scale_code.to(tl.uint8), mask=mask)


@triton.jit
def _dequantize_kernel(
    # pointers
    packed_ptr, scale_ptr, global_scale_ptr, out_ptr,
    # sizes
    num_blocks, blocks_per_matrix,
    # meta-parameters
    BLOCK_R: tl.constexpr, INTERPRETED: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = rows < num_blocks
    pairs = tl.arange(0, 8)
    byte = tl.load(packed_ptr + rows[:, None] * 8 + pairs[None, :], mask=mask[:, None],
                   other=0).to(tl.int32)
    scale = e4m3_to_f32(tl.load(scale_ptr + rows, mask=mask, other=0).to(tl.int32))
    gs = tl.load(global_scale_ptr + rows // blocks_per_matrix, mask=mask, other=1.0)
    step = (scale * gs)[:, None]
    base = rows[:, None] * 16 + pairs[None, :] * 2
    out_ty: tl.constexpr = out_ptr.dtype.element_ty
    lo = to_dtype_rn(e2m1_to_f32(byte & 15) * step, out_ty, INTERPRETED)
    hi = to_dtype_rn(e2m1_to_f32(byte >> 4) * step, out_ty, INTERPRETED)
    tl.store(out_ptr + base, lo, mask=mask[:, None])
    tl.store(out_ptr + base + 1, hi, mask=mask[:, None])


QUANT_BLOCK_R = 64  # 16-element blocks per program


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


def _given_global_scale(w: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    if global_scale.dtype != torch.float32 or tuple(global_scale.shape) != tuple(w.shape[:-2]):
        raise ValueError(
            f"global_scale must be float32 {tuple(w.shape[:-2])} for w {tuple(w.shape)}, got "
            f"{global_scale.dtype} {tuple(global_scale.shape)}"
        )
    return global_scale


def quantize_ref(w: torch.Tensor, global_scale: torch.Tensor | None = None,
                 check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-torch NVFP4 quantization; see the module docstring for the exact rules.

    global_scale, when given, replaces amax / (6 * 448) (activations quantized with a
    calibrated input_scale); values beyond 6 * 448 * global_scale saturate.
    """
    _check_weight(w)
    if check_finite and not torch.isfinite(w).all():
        raise ValueError(
            f"w {tuple(w.shape)} holds NaN or infinite values; NVFP4 cannot store them"
        )
    *lead, n, k = w.shape
    x = w.float().reshape(*lead, n, k // BLOCK_SIZE, BLOCK_SIZE)
    gs = global_scale_ref(w) if global_scale is None else _given_global_scale(w, global_scale)
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


def quantize_triton(w: torch.Tensor, global_scale: torch.Tensor | None = None,
                    check_finite: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton NVFP4 quantizer; the same bits as quantize_ref. check_finite=False skips
    the NaN check (a host sync), for activations inside a captured graph."""
    _check_weight(w)
    check_triton_device(w)
    if check_finite and not torch.isfinite(w).all():
        raise ValueError(
            f"w {tuple(w.shape)} holds NaN or infinite values; NVFP4 cannot store them"
        )
    *lead, n, k = w.shape
    w = w.contiguous()
    # The global scale is one reduction per matrix: the same torch code as the reference.
    gs = (global_scale_ref(w) if global_scale is None
          else _given_global_scale(w, global_scale)).contiguous()
    packed = torch.empty(*lead, n, k // 2, dtype=torch.uint8, device=w.device)
    scale = torch.empty(*lead, n, k // BLOCK_SIZE, dtype=torch.uint8, device=w.device)
    num_blocks = w.numel() // BLOCK_SIZE
    if num_blocks:
        grid = (triton.cdiv(num_blocks, QUANT_BLOCK_R),)
        _quantize_kernel[grid](w, packed, scale, gs, num_blocks, n * k // BLOCK_SIZE,
                               BLOCK_R=QUANT_BLOCK_R)
    return packed, scale.view(torch.float8_e4m3fn), gs


def dequantize_triton(packed: torch.Tensor, block_scale: torch.Tensor,
                      global_scale: torch.Tensor,
                      dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The Triton NVFP4 dequantizer; the same bits as dequantize_ref."""
    n, k = check_packed(packed, block_scale, global_scale)
    check_triton_device(packed, block_scale, global_scale)
    lead = packed.shape[:-2]
    out = torch.empty(*lead, n, k, dtype=dtype, device=packed.device)
    num_blocks = out.numel() // BLOCK_SIZE
    if num_blocks:
        grid = (triton.cdiv(num_blocks, QUANT_BLOCK_R),)
        _dequantize_kernel[grid](packed.contiguous(),
                                 block_scale.contiguous().view(torch.uint8),
                                 global_scale.contiguous(), out, num_blocks,
                                 n * k // BLOCK_SIZE, BLOCK_R=QUANT_BLOCK_R,
                                 INTERPRETED=INTERPRET)
    return out


def _use_triton(backend: str, t: torch.Tensor) -> bool:
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend={backend!r} is not allowed; allowed: auto, torch, triton")
    return backend == "triton" or (backend == "auto" and t.is_cuda)


def quantize(w: torch.Tensor, backend: str = "auto", global_scale: torch.Tensor | None = None,
             check_finite: bool = True):
    """NVFP4-quantizes `w` [..., N, K] (float, K % 16 == 0).

    Returns (packed uint8 [..., N, K/2], block_scale float8_e4m3fn [..., N, K/16],
    global_scale float32 [...]). backend: "torch" (reference), "triton", or "auto" (Triton
    on CUDA tensors). Both give the same bits. global_scale (float32 [...]) replaces the
    computed one; check_finite=False skips the NaN/inf check.
    """
    if _use_triton(backend, w):
        return quantize_triton(w, global_scale, check_finite)
    return quantize_ref(w, global_scale, check_finite)


def dequantize(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
               dtype: torch.dtype = torch.bfloat16, backend: str = "auto") -> torch.Tensor:
    """NVFP4 triple -> [..., N, K] in `dtype` (w = e2m1 * (block_scale * global_scale))."""
    if _use_triton(backend, packed):
        return dequantize_triton(packed, block_scale, global_scale, dtype)
    return dequantize_ref(packed, block_scale, global_scale, dtype)
