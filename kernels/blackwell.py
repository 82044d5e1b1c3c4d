"""Native FP4 linear layers for Blackwell (compute capability >= 10.0): NVFP4 x NVFP4 on the
FP4 tensor cores through torch._scaled_mm (cuBLASLt block-scaled GEMM), behind the same
QuantLinear API. Hopper and older run the W4A16 Triton GEMM instead.

Shapes: `x [M, K] @ W[N, K].T -> [M, N]`.

Activations are quantized to NVFP4 per call with the checkpoint's input_scale as their
global scale (W4A16_NVFP4 checkpoints carry none: then amax(x) / (6 * 448), computed on the
device). The GEMM applies the e4m3 block scales of both operands; the two global scales
multiply the fp32 result.

Block-scale layout cuBLAS reads (its "128x4" tiles, torch's SWIZZLE_32_4_4): the [R, C]
scale matrix (R rows of the operand, C = K / 16) is padded with zeros to multiples of
(128, 4) and cut into 128x4 tiles stored one after another, row-tile major; inside a tile,
scale (r, c) sits at byte (r % 32) * 16 + (r // 32) * 4 + c.
"""

from __future__ import annotations

import torch

from baton.kernels import nvfp4

TILE_ROWS, TILE_COLS = 128, 4


def device_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def select_nvfp4_path(device: torch.device, n: int, k: int) -> str:
    """"native_fp4" on Blackwell-class GPUs for shapes cuBLAS takes, else "w4a16"."""
    if device.type != "cuda" or not hasattr(torch, "float4_e2m1fn_x2"):
        return "w4a16"
    if device_capability(device) < (10, 0):
        return "w4a16"
    # cuBLASLt wants 16-byte aligned leading dimensions: K/2 bytes of FP4, N bf16 outputs.
    return "native_fp4" if k % 32 == 0 and n % 8 == 0 else "w4a16"


def swizzled_offset(r: int, c: int, cols: int) -> int:
    """Byte offset of scale (r, c) of an [R, cols] scale matrix in the swizzled layout."""
    col_tiles = -(-cols // TILE_COLS)
    tile = (r // TILE_ROWS) * col_tiles + c // TILE_COLS
    rr, cc = r % TILE_ROWS, c % TILE_COLS
    return tile * TILE_ROWS * TILE_COLS + (rr % 32) * 16 + (rr // 32) * 4 + cc


def swizzle_block_scales(scale: torch.Tensor) -> torch.Tensor:
    """e4m3 [R, C] -> flat e4m3 [ceil(R/128)*128 * ceil(C/4)*4] in cuBLAS's tile layout."""
    if scale.dim() != 2:
        raise ValueError(f"scale must be [R, C], got {tuple(scale.shape)}")
    rows, cols = scale.shape
    row_tiles, col_tiles = -(-rows // TILE_ROWS), -(-cols // TILE_COLS)
    padded = torch.zeros(row_tiles * TILE_ROWS, col_tiles * TILE_COLS, dtype=torch.uint8,
                         device=scale.device)
    padded[:rows, :cols] = scale.view(torch.uint8)
    # [row tile, 4 groups of 32 rows, 32 rows, col tile, 4 cols] -> [row tile, col tile,
    # 32 rows, 4 groups, 4 cols]: offset (r % 32) * 16 + (r // 32) * 4 + c inside a tile.
    tiles = padded.view(row_tiles, 4, 32, col_tiles, TILE_COLS).permute(0, 3, 2, 1, 4)
    return tiles.contiguous().flatten().view(torch.float8_e4m3fn)


def unswizzle_block_scales(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The inverse of swizzle_block_scales -> e4m3 [rows, cols]."""
    row_tiles, col_tiles = -(-rows // TILE_ROWS), -(-cols // TILE_COLS)
    if flat.numel() != row_tiles * col_tiles * TILE_ROWS * TILE_COLS:
        raise ValueError(
            f"flat has {flat.numel()} scales; [{rows}, {cols}] swizzles to "
            f"{row_tiles * col_tiles * TILE_ROWS * TILE_COLS}"
        )
    tiles = flat.view(torch.uint8).view(row_tiles, col_tiles, 32, 4, TILE_COLS)
    padded = tiles.permute(0, 3, 2, 1, 4).reshape(row_tiles * TILE_ROWS, col_tiles * TILE_COLS)
    return padded[:rows, :cols].contiguous().view(torch.float8_e4m3fn)


def activation_global_scale(x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
    """The activations' NVFP4 global scale: input_scale, else amax(x) / (6 * 448) (1 if 0)."""
    if input_scale is not None:
        return input_scale.float().reshape(())
    return nvfp4.global_scale_ref(x)


def nvfp4_linear_native(x: torch.Tensor, packed: torch.Tensor, block_scale: torch.Tensor,
                        global_scale: torch.Tensor, input_scale: torch.Tensor | None,
                        bias: torch.Tensor | None = None,
                        swizzled_weight_scale: torch.Tensor | None = None,
                        scaled_mm=None) -> torch.Tensor:
    """W4A4 x [M, K] @ NVFP4 W[N, K].T (+ bias) -> [M, N] in x.dtype on FP4 tensor cores.

    swizzled_weight_scale: swizzle_block_scales(block_scale), computed once by the caller.
    scaled_mm: the block-scaled GEMM (torch._scaled_mm; tests pass an emulation).
    """
    n, k = nvfp4.check_packed(packed, block_scale, global_scale)
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, K={k}], got {tuple(x.shape)}")
    scaled_mm = scaled_mm or torch._scaled_mm
    x_gs = activation_global_scale(x, input_scale)
    x_packed, x_scale, _ = nvfp4.quantize(x, global_scale=x_gs, check_finite=False)
    if swizzled_weight_scale is None:
        swizzled_weight_scale = swizzle_block_scales(block_scale)
    fp4 = torch.float4_e2m1fn_x2
    out = scaled_mm(x_packed.view(fp4), packed.view(fp4).t(),
                    scale_a=swizzle_block_scales(x_scale), scale_b=swizzled_weight_scale,
                    out_dtype=torch.bfloat16)
    out = out.float() * (x_gs * global_scale)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


def scaled_mm_emulated(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor,
                       scale_b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """What cuBLAS's NVFP4 block-scaled GEMM computes, in pure torch (the CPU reference for
    nvfp4_linear_native): a [M, K/2] fp4x2 row-major, b [K/2, N] fp4x2 column-major, scales
    swizzled e4m3, one per 16 elements along K."""
    m, n, k = a.shape[0], b.shape[1], a.shape[1] * 2
    a_codes = nvfp4.unpack_codes(a.view(torch.uint8))
    b_codes = nvfp4.unpack_codes(b.t().view(torch.uint8))
    sa = unswizzle_block_scales(scale_a, m, k // 16).float().repeat_interleave(16, dim=1)
    sb = unswizzle_block_scales(scale_b, n, k // 16).float().repeat_interleave(16, dim=1)
    a_val = nvfp4.e2m1_values(a_codes) * sa
    b_val = nvfp4.e2m1_values(b_codes) * sb
    return (a_val.double() @ b_val.double().T).to(out_dtype)
