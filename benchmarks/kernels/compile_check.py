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

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from baton.kernels import (
    attention_decode,
    attention_prefill,
    fused_moe,
    mamba_conv,
    mamba_conv_step,
    mamba_step,
    moe_decode,
    nvfp4,
    ssd_chunk_scan,
    ssd_chunk_state,
    ssd_state_passing,
    w4a16_gemm,
)

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
    yield from mamba_variants()
    yield from attention_variants()


def _sig(names: str, ty: str) -> dict:
    return {name: ty for name in names.split()}


# Strides that are small odd numbers at Nano shapes (the conv state's k - 1 = 3 taps, the
# conv weight's k = 4, a block table's row): the JIT gives them no divisibility.
PLAIN_STRIDES = {"stride_s_w", "stride_w_w", "stride_win_w", "stride_table_s"}


def mamba_variants():
    """The Mamba2 kernels at Nemotron 3 Nano's shapes (64 heads of 64, 8 groups, state 128,
    chunk 128, conv_dim 6144, 4 taps), bf16 activations, fp32 (and bf16) SSM state."""
    i32 = "i32"
    yield ("mamba chunk cumsum", ssd_chunk_state._chunk_cumsum_kernel,
           {**_sig("dt_ptr dt_bias_ptr", "*bf16"), "a_ptr": "*fp32",
            **_sig("chunk_start_ptr chunk_len_ptr", "*i32"),
            **_sig("dt_out_ptr da_cs_ptr", "*fp32"), **_sig("heads chunk_size", i32),
            **_sig("dt_low dt_high", "fp32"),
            **_sig("stride_dt_t stride_dt_h stride_out_c stride_out_h", i32)},
           {"BLOCK_L": 128, "BLOCK_H": 16, "HAS_BIAS": True, "stride_dt_h": 1}, 4, 3)
    for act in ("bf16", "fp32"):
        cfg = ssd_chunk_state._state_config(64, 128, 128, _CUDA)
        yield (f"mamba chunk state {act}", ssd_chunk_state._chunk_state_kernel,
               {**_sig("x_ptr b_ptr", f"*{act}"), **_sig("dt_out_ptr da_cs_ptr", "*fp32"),
                **_sig("chunk_start_ptr chunk_len_ptr", "*i32"), "states_ptr": "*fp32",
                **_sig("head_dim dstate heads_per_group chunk_size", i32),
                **_sig("stride_x_t stride_x_h stride_x_p stride_b_t stride_b_g stride_b_n "
                       "stride_dt_c stride_dt_h stride_st_c stride_st_h stride_st_p "
                       "stride_st_n", i32)},
               {**_blocks(cfg), **_dots(act), "stride_x_p": 1, "stride_b_n": 1,
                "stride_st_n": 1}, cfg["num_warps"], cfg["num_stages"])
    for state in ("fp32", "bf16"):
        yield (f"mamba state passing {state} state", ssd_state_passing._state_passing_kernel,
               {**_sig("states_ptr da_cs_ptr", "*fp32"), "ssm_ptr": f"*{state}",
                "slot_ptr": "*i64", "has_init_ptr": "*i1", "seq_chunks_ptr": "*i32",
                **_sig("dstate state_size chunk_size", i32),
                **_sig("stride_st_c stride_st_h stride_cs_c stride_cs_h stride_ssm_s "
                       "stride_ssm_h stride_ssm_p stride_ssm_n", i32)},
               {"BLOCK": 1024, "HAS_INIT_FLAGS": True, "INTERPRETED": False,
                "stride_ssm_n": 1}, 4, 3)
    for act in ("bf16", "fp32"):
        scan_cfg = ssd_chunk_scan._scan_config(64, 128, 128, _CUDA, _DTYPES[act])
        yield (f"mamba chunk scan {act}", ssd_chunk_scan._chunk_scan_kernel,
               {**_sig("x_ptr c_ptr b_ptr", f"*{act}"),
                **_sig("dt_out_ptr da_cs_ptr states_ptr", "*fp32"), "d_ptr": f"*{act}",
                "out_ptr": "*fp32", **_sig("chunk_seq_ptr chunk_start_ptr chunk_len_ptr", "*i32"),
                "slot_ptr": "*i64", **_sig("head_dim dstate heads_per_group", i32),
                **_sig("stride_x_t stride_x_h stride_x_p stride_c_t stride_c_g stride_c_n "
                       "stride_b_t stride_b_g stride_b_n stride_dt_c stride_dt_h stride_st_c "
                       "stride_st_h stride_st_p stride_st_n stride_o_t stride_o_h stride_o_p",
                       i32)},
               {**_blocks(scan_cfg), "HAS_D": True, **_dots(act), "INTERPRETED": False,
                "stride_x_p": 1, "stride_c_n": 1, "stride_b_n": 1, "stride_st_n": 1,
                "stride_o_p": 1},
               scan_cfg["num_warps"], scan_cfg["num_stages"])
    update_sig = {"state_ptr": "*fp32", **_sig("x_ptr dt_ptr dt_bias_ptr", "*bf16"),
                  "a_ptr": "*fp32", **_sig("b_ptr c_ptr d_ptr", "*bf16"), "out_ptr": "*fp32",
                  "slot_ptr": "*i64", "has_init_ptr": "*i1", "cu_ptr": "*i32",
                  "snap_ptr": "*fp32", **_sig("head_dim dstate heads_per_group", i32),
                  **_sig("dt_low dt_high", "fp32"),
                  **_sig("stride_s_slot stride_s_h stride_s_p stride_s_n stride_x_t stride_x_h "
                         "stride_x_p stride_dt_t stride_dt_h stride_b_t stride_b_g stride_b_n "
                         "stride_c_t stride_c_g stride_c_n stride_o_t stride_o_h stride_o_p "
                         "stride_sn_slot stride_sn_j stride_sn_h stride_sn_p stride_sn_n", i32)}
    units = {name: 1 for name in ("stride_s_n", "stride_x_p", "stride_dt_h", "stride_b_n",
                                  "stride_c_n", "stride_o_p", "stride_sn_n")}
    for name, tokens, verify in (("decode", 1, False), ("verify 1+3", 4, True)):
        yield (f"mamba state update {name}", mamba_step._ssm_state_update_kernel,
               update_sig,
               {"BLOCK_P": 16, "BLOCK_N": 128, "MAX_TOKENS": tokens, "HAS_D": True,
                "HAS_BIAS": True, "HAS_INIT_FLAGS": True, "VARLEN": verify,
                "SNAPSHOTS": verify, "INTERPRETED": False, **units}, 4, 3)
    conv_flags = {"HAS_BIAS": True, "HAS_INIT_FLAGS": True, "SILU": True, "INTERPRETED": False}
    yield ("mamba conv1d prefill", mamba_conv._causal_conv1d_kernel,
           {**_sig("x_ptr state_ptr weight_ptr bias_ptr out_ptr", "*bf16"), "slot_ptr": "*i64",
            "has_init_ptr": "*i1",
            **_sig("cu_ptr chunk_seq_ptr chunk_start_ptr chunk_len_ptr", "*i32"), "width": i32,
            **_sig("stride_x_t stride_s_slot stride_s_w stride_w_w stride_o_t", i32)},
           {"KERNEL": 4, "BLOCK_T": 16, "BLOCK_W": 64, **conv_flags}, 4, 3)
    yield ("mamba conv1d prefill state", mamba_conv._conv_state_kernel,
           {**_sig("x_ptr state_ptr", "*bf16"), "slot_ptr": "*i64", "has_init_ptr": "*i1",
            "cu_ptr": "*i32", "width": i32, **_sig("stride_x_t stride_s_slot stride_s_w", i32)},
           {"TAPS": 3, "BLOCK_TAPS": 4, "BLOCK_W": 256, "HAS_INIT_FLAGS": True}, 4, 3)
    for name, tokens, verify in (("decode", 1, False), ("verify 1+3", 4, True)):
        yield (f"mamba conv1d update {name}", mamba_conv_step._causal_conv1d_update_kernel,
               {**_sig("x_ptr state_ptr weight_ptr bias_ptr out_ptr", "*bf16"),
                "slot_ptr": "*i64", "has_init_ptr": "*i1", "cu_ptr": "*i32",
                "windows_ptr": "*bf16", "width": i32,
                **_sig("stride_x_t stride_s_slot stride_s_w stride_w_w stride_o_t "
                       "stride_win_slot stride_win_w", i32)},
               {"KERNEL": 4, "MAX_TOKENS": tokens, "BLOCK_W": 256, "BLOCK_K": 4,
                "BLOCK_COLS": 8 if verify else 4, "VARLEN": verify, "WINDOWS": verify,
                **conv_flags}, 4, 3)


def attention_variants():
    """Paged attention at Nano's shapes: 32 query heads, 2 KV heads of 128, pages of 16."""
    i32 = "i32"

    def paged(act):
        return {**_sig("q_ptr k_ptr v_ptr", f"*{act}"),
                **_sig("table_ptr ctx_ptr cu_ptr", "*i32"), "out_ptr": f"*{act}"}

    strides = ("stride_q_t stride_q_h stride_k_page stride_k_tok stride_k_h stride_v_page "
               "stride_v_tok stride_v_h stride_table_s stride_o_t stride_o_h")
    ws = ("stride_ws_s stride_ws_split stride_ws_t stride_ws_h stride_lse_s stride_lse_split "
          "stride_lse_t")
    for act, name, queries, single in (("bf16", "decode", 1, False),
                                       ("bf16", "decode one split", 1, True),
                                       ("bf16", "verify 1+3", 4, False),
                                       ("fp32", "decode", 1, False)):
        yield (f"attention paged {name} {act}", attention_decode._paged_decode_kernel,
               {**paged(act), **_sig("ws_out_ptr ws_lse_ptr", "*fp32"),
                **_sig("head_dim page_size split_tokens", i32), "qk_scale": "fp32",
                **_sig(f"{strides} {ws}", i32)},
               {"GROUP": 16, "MAX_QUERIES": queries, "BLOCK_M": 16 * queries,
                "BLOCK_N": 64 if act == "bf16" else 32,
                "BLOCK_D": 128, "SINGLE_SPLIT": single, "VARLEN": queries > 1, **_dots(act),
                "INTERPRETED": False}, 4, 3)
    yield ("attention paged combine splits", attention_decode._combine_splits_kernel,
           {**_sig("ws_out_ptr ws_lse_ptr", "*fp32"), **_sig("ctx_ptr cu_ptr", "*i32"),
            "out_ptr": "*bf16", **_sig("head_dim split_tokens", i32),
            **_sig(f"{ws} stride_o_t stride_o_h", i32)},
           {"MAX_QUERIES": 1, "BLOCK_D": 128, "VARLEN": False, "INTERPRETED": False}, 2, 3)
    for act in ("bf16", "fp32"):
        yield (f"attention prefill {act}", attention_prefill._prefill_attention_kernel,
               {**paged(act), **_sig("head_dim page_size", i32), "qk_scale": "fp32",
                **_sig(strides, i32)},
               {"GROUP": 16, "BLOCK_M": 64 if act == "bf16" else 32,
                "BLOCK_N": 64 if act == "bf16" else 32, "BLOCK_D": 128, **_dots(act),
                "INTERPRETED": False}, 4 if act == "bf16" else 8, 3)


def _dots(act: str) -> dict:
    """The products' constexprs: 16-bit operands as they are, fp32 ones in three tf32 passes."""
    return {"DOT_F32": act == "fp32", "F32_PRECISION": "tf32x3"}


_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class _Cuda:
    type = "cuda"


_CUDA = _Cuda()  # the launchers' tile choices for a CUDA device, without one


def _blocks(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k.startswith("BLOCK")}


def _attrs(kernel, signature: dict, constexprs: dict) -> dict:
    """The JIT's run-time specialization: pointers 16-byte aligned, sizes and strides
    multiples of 16 (the unit strides are constexprs), but for PLAIN_STRIDES."""
    attrs = {}
    for name, ty in signature.items():
        if name in constexprs or name in PLAIN_STRIDES:
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
    parser.add_argument("--only", default="",
                        help="comma-separated substrings of the variant names to keep")
    args = parser.parse_args(argv)
    failures = []
    for arch in args.arch or [90]:
        target = GPUTarget("cuda", arch, 32)
        for name, kernel, signature, constexprs, warps, stages in variants():
            if not any(part in name for part in args.only.split(",")):
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
