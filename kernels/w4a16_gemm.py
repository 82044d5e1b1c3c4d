"""W4A16 GEMM for NVFP4 weights: y = x @ W.T with W decoded from E2M1 + scales in registers.

Shapes: `x [M, K] @ W[N, K].T -> [M, N]`  M tokens, N out_features, K in_features.

Hopper has no FP4 tensor cores (and Triton 3.6's tl.dot_scaled rejects e4m3 scales on
16-element groups there), so each program decodes its weight tile itself:

    packed      uint8 [N, K/2]    byte j of row n: element 2j low nibble, 2j+1 high nibble
    block_scale e4m3  [N, K/16]   read as uint8 bits, decoded exactly to fp32
    global_scale fp32 []          applied once to the fp32 accumulator at the end

    tile w[n, k] = e2m1(code) * block_scale: at most 2 + 4 significant bits, so it is exact
    in bf16/fp16 and the tensor-core dot sees the checkpoint's values; accumulation is fp32.

Decode-sized M (<= 64) is memory-bound: the grid splits K (SPLIT_K partial sums in fp32,
added in a fixed order, never with atomics, so repeated runs give the same bits) until there
are enough programs to keep every SM streaming weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from baton.kernels import nvfp4
from baton.kernels.triton_common import (
    INTERPRET,
    check_triton_device,
    e2m1_pair_to_f32_scaled,
    e4m3_to_f32,
    to_dtype_rn,
)


@triton.jit
def load_nvfp4_tile(packed_ptr, scale_ptr, offs_n, k0, N, K, stride_pn, stride_sn,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Weight tile [BLOCK_N, BLOCK_K] in fp32 (without the global scale) for columns
    k0 .. k0 + BLOCK_K; rows >= N and columns >= K read as 0."""
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    offs_s = k0 // 16 + tl.arange(0, BLOCK_K // 16)
    n_mask = (offs_n < N)[:, None]
    byte = tl.load(packed_ptr + offs_n[:, None] * stride_pn + offs_b[None, :],
                   mask=n_mask & (offs_b[None, :] < K // 2), other=0).to(tl.int32)
    scale_bits = tl.load(scale_ptr + offs_n[:, None] * stride_sn + offs_s[None, :],
                         mask=n_mask & (offs_s[None, :] < K // 16), other=0).to(tl.int32)
    lo, hi = e2m1_pair_to_f32_scaled(byte)
    w = tl.reshape(tl.interleave(lo, hi), (BLOCK_N, BLOCK_K // 16, 16))
    # Exact: E2M1 * 2**-14 has 2 significant bits, the e4m3 scale * 2**14 has 4.
    w = w * (e4m3_to_f32(scale_bits) * 16384.0)[:, :, None]
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _w4a16_gemm_kernel(
    # pointers
    x_ptr, packed_ptr, scale_ptr, global_scale_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, K, tiles_per_split,
    # strides
    stride_xm, stride_xk, stride_pn, stride_sn, stride_os, stride_om, stride_on,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, INTERPRETED: tl.constexpr,
):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Split boundaries in whole K tiles: the compiler then knows every k0 is a multiple of
    # BLOCK_K and vectorizes the packed-weight loads.
    k_start = pid_k * tiles_per_split * BLOCK_K
    k_end = tl.minimum(k_start + tiles_per_split * BLOCK_K, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = load_nvfp4_tile(packed_ptr, scale_ptr, offs_n, k0, N, K, stride_pn, stride_sn,
                            BLOCK_N, BLOCK_K)
        if DOT_F32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)), acc)
    acc = acc * tl.load(global_scale_ptr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out_ty: tl.constexpr = out_ptr.dtype.element_ty
    out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om
    tl.store(out_ptrs + offs_n[None, :] * stride_on, to_dtype_rn(acc, out_ty, INTERPRETED),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@dataclass(frozen=True)
class GemmConfig:
    """A tile configuration: BLOCK_K is a multiple of 32 (whole bytes and whole scale blocks)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        if self.block_k % 32 or self.block_m < 16 or self.block_n < 16 or self.split_k < 1:
            raise ValueError(
                f"{self}: block_k must be a multiple of 32, block_m and block_n >= 16, "
                "split_k >= 1"
            )


def _pow2_at_least(value: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(value, 1))))


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def gemm_config(m: int, n: int, k: int, device: torch.device) -> GemmConfig:
    """Tiles per shape: decode-sized M streams weights with split K, prefill-sized M uses
    large tiles for tensor-core throughput. The interpreter gets few, large blocks."""
    if device.type != "cuda":
        return GemmConfig(_pow2_at_least(m, 16, 64), _pow2_at_least(n, 16, 64),
                          _pow2_at_least(k, 32, 128))
    if m <= 64:
        # A [64, 128] weight tile decodes to 64 fp32 values per thread of 4 warps; deeper
        # K tiles would spill. Split K supplies the parallelism instead.
        cfg = GemmConfig(_pow2_at_least(m, 16, 64), 64, 128, num_warps=4, num_stages=4)
    elif m <= 256:
        cfg = GemmConfig(64, 128, 64, num_warps=4, num_stages=4)
    else:
        cfg = GemmConfig(128, 128, 64, num_warps=8, num_stages=3)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    sms = _sm_count(device)
    if tiles < sms:
        split = min(triton.cdiv(2 * sms, tiles), max(1, k // cfg.block_k), 16)
        cfg = GemmConfig(cfg.block_m, cfg.block_n, cfg.block_k, split, cfg.num_warps,
                         cfg.num_stages)
    return cfg


def w4a16_gemm(x: torch.Tensor, packed: torch.Tensor, block_scale: torch.Tensor,
               global_scale: torch.Tensor, bias: torch.Tensor | None = None,
               config: GemmConfig | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32) @ NVFP4 W[N, K].T (+ bias [N]) -> [M, N] in x.dtype."""
    n, k = nvfp4.check_packed(packed, block_scale, global_scale)
    if packed.dim() != 2:
        raise ValueError(f"packed must be [N, K/2], got {tuple(packed.shape)}")
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, K={k}], got {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    check_triton_device(x, packed, block_scale, global_scale)
    m = x.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    cfg = config or gemm_config(m, n, k, x.device)
    packed = packed if packed.stride(1) == 1 else packed.contiguous()
    scale = block_scale.view(torch.uint8)
    scale = scale if scale.stride(1) == 1 else scale.contiguous()
    tiles_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k)
    split = triton.cdiv(k, tiles_per_split * cfg.block_k)
    target = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32,
                                                device=x.device)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), split)
    _w4a16_gemm_kernel[grid](
        x, packed, scale, global_scale, bias if bias is not None else global_scale, target,
        m, n, k, tiles_per_split,
        x.stride(0), x.stride(1), packed.stride(0), scale.stride(0),
        target.stride(0) if split > 1 else 0, target.stride(-2), target.stride(-1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        HAS_BIAS=bias is not None and split == 1,
        DOT_F32=x.dtype == torch.float32 or (INTERPRET and x.dtype == torch.bfloat16),
        INTERPRETED=INTERPRET, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        # Partials add in split order (torch's sum over a fixed shape is deterministic).
        acc = target.sum(dim=0)
        if bias is not None:
            acc += bias.float()
        out.copy_(acc)
    return out


def nvfp4_linear(x: torch.Tensor, packed: torch.Tensor, block_scale: torch.Tensor,
                 global_scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """QuantLinear's Triton path: x [M, K] -> [M, N] (W4A16, NVFP4 weights)."""
    return w4a16_gemm(x, packed, block_scale, global_scale, bias)


def w4a16_gemm_ref(x: torch.Tensor, packed: torch.Tensor, block_scale: torch.Tensor,
                   global_scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pure torch: x @ dequantize(W).T in fp32 (+ bias) -> x.dtype."""
    w = nvfp4.dequantize_ref(packed, block_scale, global_scale, torch.float32)
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)
