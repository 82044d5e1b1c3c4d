"""Pieces the Triton kernels share: the interpreter flag, device and argument checks, how
products are taken (dot_in_f32, f32_precision), the rows of a sequence in a packed batch
(seq_rows), and exact decoders / encoders for the E2M1 and E4M3 codes (built from integer
bits, so they give the same values on every GPU generation and in the CPU interpreter)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Read once, like Triton itself does when @triton.jit runs.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_triton_device(*tensors: torch.Tensor) -> None:
    """Triton runs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    for t in tensors:
        if t.is_cuda:
            continue
        if not INTERPRET:
            raise ValueError(
                f"a {t.device} tensor reached a Triton kernel: they need CUDA tensors, or "
                "TRITON_INTERPRET=1 set before baton.kernels is imported"
            )


def check_shape(name: str, t: torch.Tensor | None, shape: tuple, what: str) -> None:
    """t has `shape` (None entries match anything)."""
    if t is None:
        return
    if t.dim() != len(shape) or any(want is not None and got != want
                                    for got, want in zip(t.shape, shape)):
        want = ", ".join("*" if d is None else str(d) for d in shape)
        raise ValueError(f"{name}: expected {what} [{want}], got {tuple(t.shape)}")


def check_unit_stride(name: str, t: torch.Tensor) -> None:
    """The innermost dimension is read as a vector: it must be contiguous."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension must have stride 1, got strides "
                         f"{tuple(t.stride())}")


def dot_in_f32(dtype: torch.dtype, interpret: bool) -> bool:
    """Tensor-core products take 16-bit operands as they are; fp32 operands (and bf16 ones
    in the interpreter, whose bf16 tl.dot is wrong) go through an exact fp32 product."""
    return dtype == torch.float32 or (interpret and dtype == torch.bfloat16)


def f32_precision(device: torch.device) -> str:
    """How tl.dot multiplies fp32 operands: three tf32 passes on a GPU (fp32 accuracy on
    tensor cores; plain fp32 products there need so many registers that they spill), exact
    in the interpreter."""
    return "tf32x3" if device.type == "cuda" else "ieee"


def pow2(n: int, low: int = 16) -> int:
    return max(low, triton.next_power_of_2(max(1, n)))


@triton.jit
def seq_rows(cu_ptr, seq, MAX_ROWS: tl.constexpr, VARLEN: tl.constexpr):
    """(first row, rows) of sequence `seq` of a packed batch: rows cu_seqlens[seq] ..
    cu_seqlens[seq + 1] - 1, at most MAX_ROWS of them; without VARLEN one row per sequence
    (row = seq)."""
    if VARLEN:
        first = tl.load(cu_ptr + seq)
        rows = tl.minimum(tl.load(cu_ptr + seq + 1) - first, MAX_ROWS)
    else:
        first = seq
        rows = first * 0 + 1
    return first, rows


@triton.jit
def e2m1_to_f32(code):
    """E2M1 code (int32, 0..15) -> fp32; code 8 is -0.0."""
    mag_idx = code & 7
    exp = mag_idx >> 1
    mant = mag_idx & 1
    normal = (((exp + 126) << 23) | (mant << 22)).to(tl.float32, bitcast=True)
    mag = tl.where(exp > 0, normal, mant.to(tl.float32) * 0.5)
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def e2m1_pair_to_f32_scaled(byte):
    """Packed byte (int32) -> (low nibble, high nibble) as fp32 E2M1 values times 2**-14.

    Each nibble is moved into an fp16 bit pattern (sign to bit 15, the 2 exponent bits and
    the mantissa bit to bits 9-11): fp16's exponent bias is 15 where E2M1's is 1, so the
    pattern reads as the value times 2**-14, with code 1 (0.5) landing exactly on an fp16
    subnormal. 5 integer operations per value instead of a decode by cases; the caller
    folds 2**14 into the block scale.
    """
    lo = ((byte & 7) << 9) | ((byte & 8) << 12)
    hi = ((byte & 0x70) << 5) | ((byte & 0x80) << 8)
    lo = lo.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = hi.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def e4m3_to_f32(bits):
    """float8_e4m3fn bits (int32, 0..0x7E) -> fp32."""
    exp = (bits >> 3) & 15
    mant = bits & 7
    normal = (((exp + 120) << 23) | (mant << 20)).to(tl.float32, bitcast=True)
    subnormal = mant.to(tl.float32) * 0.001953125  # 2**-9
    mag = tl.where(exp == 0, subnormal, normal)
    return tl.where((bits & 0x80) != 0, -mag, mag)


@triton.jit
def f32_to_e4m3_positive(s):
    """Non-negative fp32 s <= 448 -> (e4m3 bits int32, the e4m3 value as fp32), rounded to
    nearest with ties to even, as torch's cast does."""
    bits = s.to(tl.int32, bitcast=True)
    # Normal range (s >= 2**-6): round the fp32 mantissa to 3 bits, ties to even.
    rounded = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # ~0xFFFFF
    normal_val = rounded.to(tl.float32, bitcast=True)
    normal_code = ((((rounded >> 23) & 255) - 120) << 3) | ((rounded >> 20) & 7)
    # Subnormal range: multiples of 2**-9; adding 2**14 leaves an ulp of 2**-9, so the fp32
    # addition itself rounds to nearest even.
    sub_val = (s + 16384.0) - 16384.0
    sub_code = (sub_val * 512.0).to(tl.int32)
    is_normal = s >= 0.015625  # 2**-6
    return tl.where(is_normal, normal_code, sub_code), tl.where(is_normal, normal_val, sub_val)


@triton.jit
def f32_to_e2m1(q):
    """fp32 q -> nearest E2M1 code (int32): ties to even, saturating at +-6, sign kept."""
    a = tl.abs(q)
    code = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
            + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32)
            + (a > 5.0).to(tl.int32))
    return code | tl.where(q < 0, 8, 0)


@triton.jit
def to_dtype_rn(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 x -> `dtype` rounded to nearest even. The interpreter truncates fp32 -> bf16, so
    there the rounding is done on the bits (GPUs round to nearest even natively)."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
