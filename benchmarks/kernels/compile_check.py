"""Compiles every kernel variant the runtime launches for a GPU architecture, without a GPU,
and reports what the compiler made of it: registers, spills, shared memory, tensor-core
instructions, vector loads.

    python benchmarks/kernels/compile_check.py [--arch 90] [--arch 100] [--allow-spills]

Triton compiles ahead of time through its bundled ptxas; the arguments are specialized as
the JIT does at run time (16-byte aligned pointers, sizes and leading strides multiples of
16, unit strides constant), so the code is what an H100 (sm_90) or B200 (sm_100) would run.
Exit status 1 when a variant fails to compile or (without --allow-spills) spills registers.
TRITON_INTERPRET must be unset: the interpreter replaces the kernels.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_check: unset TRITON_INTERPRET (the interpreter replaces the kernels)")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from baton.kernels import fused_moe, moe_decode, nvfp4, w4a16_gemm

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
SASS_OPS = ("HGMMA", "HMMA", "LDG.E.128", "LDL", "STL")


def _dense(fmt: int) -> tuple[str, str, str]:
    """(weight, scale, scale_2) pointer types of a weight format."""
    return {0: ("*bf16", "*bf16", "*bf16"), 1: ("*u8", "*u8", "*fp32"),
            2: ("*u8", "*fp32", "*fp32")}[fmt]


def variants():
    """(name, kernel, signature, constexprs, num_warps, num_stages) the runtime launches."""
    i32 = "i32"
    yield ("nvfp4 quantize", nvfp4._quantize_kernel,
           {"w_ptr": "*bf16", "packed_ptr": "*u8", "scale_ptr": "*u8",
            "global_scale_ptr": "*fp32", "num_blocks": i32, "blocks_per_matrix": i32},
           {"BLOCK_R": nvfp4.QUANT_BLOCK_R}, 4, 3)
    yield ("nvfp4 dequantize", nvfp4._dequantize_kernel,
           {"packed_ptr": "*u8", "scale_ptr": "*u8", "global_scale_ptr": "*fp32",
            "out_ptr": "*bf16", "num_blocks": i32, "blocks_per_matrix": i32},
           {"BLOCK_R": nvfp4.QUANT_BLOCK_R, "INTERPRETED": False}, 4, 3)
    gemm_sig = {"x_ptr": "*bf16", "packed_ptr": "*u8", "scale_ptr": "*u8",
                "global_scale_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*bf16",
                "M": i32, "N": i32, "K": i32, "tiles_per_split": i32, "stride_xm": i32,
                "stride_xk": i32, "stride_pn": i32, "stride_sn": i32, "stride_os": i32,
                "stride_om": i32, "stride_on": i32}
    for cfg in (w4a16_gemm.GemmConfig(16, 64, 128, num_warps=4, num_stages=4),
                w4a16_gemm.GemmConfig(64, 64, 128, num_warps=4, num_stages=4),
                w4a16_gemm.GemmConfig(64, 128, 64, num_warps=4, num_stages=4),
                w4a16_gemm.GemmConfig(128, 128, 64, num_warps=8, num_stages=3)):
        yield (f"w4a16 gemm {cfg.block_m}x{cfg.block_n}x{cfg.block_k}",
               w4a16_gemm._w4a16_gemm_kernel, gemm_sig,
               {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                "HAS_BIAS": False, "DOT_F32": False, "INTERPRETED": False, "stride_xk": 1,
                "stride_on": 1}, cfg.num_warps, cfg.num_stages)
    for fmt, fmt_name in ((0, "bf16"), (1, "nvfp4"), (2, "fp8")):
        w, s, s2 = _dense(fmt)
        for up in (True, False):
            sig = {"a_ptr": "*bf16", "w_ptr": w, "w_scale_ptr": s, "w_scale2_ptr": s2,
                   "out_ptr": "*bf16" if up else "*fp32", "sorted_pairs_ptr": "*i32",
                   "block_expert_ptr": "*i32", "token_ids_ptr": "*i32",
                   "pair_weights_ptr": "*fp32", "N": i32, "K": i32, "num_pairs": i32,
                   "stride_am": i32, "stride_ak": i32, "stride_we": i32, "stride_wn": i32,
                   "stride_wk": i32, "stride_se": i32, "stride_sn": i32, "stride_om": i32,
                   "stride_on": i32}
            for cfg in (fused_moe.MoEConfig(16, 64, 128, num_warps=4, num_stages=4),
                        fused_moe.MoEConfig(64, 128, 64, num_warps=4, num_stages=3),
                        fused_moe.MoEConfig(128, 64, 64, num_warps=8, num_stages=3)):
                yield (f"moe {fmt_name} {'up' if up else 'down'} "
                       f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}",
                       fused_moe._moe_gemm_kernel, sig,
                       {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                        "BLOCK_K": cfg.block_k, "WEIGHT_FMT": fmt, "PER_CHANNEL": False,
                        "UP": up, "DOT_F32": False, "INTERPRETED": False, "stride_ak": 1,
                        "stride_on": 1, **({} if fmt == 1 else {"stride_wk": 1})},
                       cfg.num_warps, cfg.num_stages)
        up_sig = {"x_ptr": "*bf16", "w_ptr": w, "w_scale_ptr": s, "w_scale2_ptr": s2,
                  "hidden_ptr": "*bf16", "expert_ids_ptr": "*i64", "token_ids_ptr": "*i32",
                  "N": i32, "K": i32, "first": i32, "num_local": i32, "stride_xm": i32,
                  "stride_xk": i32, "stride_we": i32, "stride_wn": i32, "stride_wk": i32,
                  "stride_se": i32, "stride_sn": i32, "stride_hm": i32, "stride_hn": i32}
        dims = {"BLOCK_N": 16, "BLOCK_K": 256, "WEIGHT_FMT": fmt, "PER_CHANNEL": False,
                "INTERPRETED": False}
        yield (f"moe decode {fmt_name} up", moe_decode._moe_decode_up_kernel, up_sig,
               {**dims, "stride_xk": 1, "stride_hn": 1}, 4, 3)
        down_sig = {"hidden_ptr": "*bf16", "w_ptr": w, "w_scale_ptr": s, "w_scale2_ptr": s2,
                    "out_ptr": "*bf16", "expert_ids_ptr": "*i64", "pair_weights_ptr": "*fp32",
                    "N": i32, "K": i32, "first": i32, "num_local": i32, "stride_hm": i32,
                    "stride_hk": i32, "stride_we": i32, "stride_wn": i32, "stride_wk": i32,
                    "stride_se": i32, "stride_sn": i32, "stride_om": i32, "stride_on": i32}
        yield (f"moe decode {fmt_name} down", moe_decode._moe_decode_down_kernel, down_sig,
               {**dims, "TOP_K": 22, "stride_hk": 1, "stride_on": 1}, 4, 3)
    for block_p, block_e, block_m in ((64, 256, 16), (2048, 1024, 64)):
        yield (f"moe align P<={block_p} E<{block_e} BM={block_m}", fused_moe._align_kernel,
               {"expert_ids_ptr": "*i64", "sorted_pairs_ptr": "*i32", "block_expert_ptr": "*i32",
                "shift_ptr": "*i32", "num_pairs": i32, "first": i32, "num_local": i32,
                "num_rows": i32, "num_blocks": i32},
               {"BLOCK_P": block_p, "BLOCK_E": block_e, "BLOCK_M": block_m, "FILL": 1024}, 8, 3)
    yield ("moe combine", fused_moe._combine_kernel,
           {"slots_ptr": "*fp32", "out_ptr": "*bf16", "K": i32, "stride_st": i32,
            "stride_sj": i32, "stride_ot": i32},
           {"TOP_K": 22, "BLOCK": 1024, "INTERPRETED": False}, 4, 3)


def _attrs(kernel, signature: dict, constexprs: dict) -> dict:
    """The JIT's run-time specialization: pointers 16-byte aligned, sizes and strides
    multiples of 16 (the unit strides are constexprs)."""
    attrs = {}
    for name, ty in signature.items():
        if name in constexprs:
            continue
        if ty.startswith("*") or name in ("N", "K") or name.startswith("stride"):
            attrs[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
    return attrs


def report(cubin: bytes) -> tuple[str, dict[str, int]]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(BIN / "cuobjdump"), "-res-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    line = next((part.strip() for part in usage.splitlines() if "REG:" in part), "")
    return line, {op: sass.count(op) for op in SASS_OPS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append",
                        help="compute capability x10 (90: Hopper, 100: Blackwell); repeatable")
    parser.add_argument("--allow-spills", action="store_true")
    parser.add_argument("--only", default="", help="substring of the variant names to keep")
    args = parser.parse_args(argv)
    failures = []
    for arch in args.arch or [90]:
        target = GPUTarget("cuda", arch, 32)
        for name, kernel, signature, constexprs, warps, stages in variants():
            if args.only not in name:
                continue
            # Unit strides given as constexprs leave the signature (the JIT does the same).
            source = ASTSource(kernel, {k: v for k, v in signature.items() if k not in constexprs},
                               constexprs=constexprs, attrs=_attrs(kernel, signature, constexprs))
            try:
                compiled = triton.compile(source, target=target,
                                          options={"num_warps": warps, "num_stages": stages})
            except Exception as err:  # the compiler's own error text is the report
                failures.append(f"sm_{arch} {name}: {type(err).__name__}: {err}")
                print(f"sm_{arch} {name}: FAILED {type(err).__name__}", flush=True)
                continue
            usage, ops = report(compiled.asm["cubin"])
            spills = ops["LDL"] + ops["STL"]
            print(f"sm_{arch} {name}: {usage} {ops}", flush=True)
            if spills and not args.allow_spills:
                failures.append(f"sm_{arch} {name}: {spills} local-memory instructions")
    for failure in failures:
        print("FAILED:", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
