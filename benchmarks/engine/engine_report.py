"""The engine benchmark's records and report: the measured phases, one table row per batch
size (graphs, eager, transformers, the roofline), the prefill-alone row, the verdicts on the
issue's targets, and the markdown and JSON written (formulas: bench_engine.py's docstring)."""

from __future__ import annotations

import datetime
import importlib.util
import sys
from dataclasses import dataclass, field

import torch
from roofline import Sizes

TARGET_BATCH, TARGET_SPEEDUP = 16, 10.0
# The graphed batch-1 step against the roofline of its weights' format.
TARGET_ROOFLINE = {"bf16": 2.0, "nvfp4": 3.0}


@dataclass
class Phases:
    prefill_s: float
    decode_step_s: float
    decode_tokens: int
    first_tokens: list[int] = field(default_factory=list)
    """The greedy token after each prompt, in prompt order."""


@dataclass
class Row:
    batch: int
    engine: Phases
    """The graphed engine (the same as eager where graphs are not available)."""
    hf: Phases | None
    roofline_s: float
    step_bytes: float
    prompt_len: int
    hf_note: str = "-"
    """What the transformers cells show when it did not run (-: skipped, OOM)."""
    eager: Phases | None = None
    """The eager engine (EngineConfig.enforce_eager)."""
    graphs: bool = True
    """Whether the graphed engine replayed CUDA graphs (False: its cells say n/a)."""

    def cells(self) -> list[str]:
        e, h, b, no = self.engine, self.hf, self.batch, self.hf_note
        eager = self.eager or e
        na = "n/a"
        graphed = (lambda text: text) if self.graphs else (lambda text: na)
        cells = [str(b), f"{b * self.prompt_len / e.prefill_s:,.0f}"]
        cells += ([f"{b * self.prompt_len / h.prefill_s:,.0f}",
                   f"{h.prefill_s / e.prefill_s:.1f}x"] if h else [no, no])
        cells += [graphed(f"{e.decode_step_s * 1e3:.2f}"), f"{eager.decode_step_s * 1e3:.2f}"]
        cells += [f"{h.decode_step_s * 1e3:.2f}"] if h else [no]
        cells += [graphed(f"{b / e.decode_step_s:,.0f}"), f"{b / eager.decode_step_s:,.0f}"]
        cells += ([f"{b / h.decode_step_s:,.0f}" if h.decode_step_s else "inf",
                   f"{h.decode_step_s / e.decode_step_s:.1f}x"] if h else [no, no])
        cells += [f"{self.step_bytes / 1e6:,.1f}", f"{self.roofline_s * 1e3:.3f}",
                  graphed(f"{e.decode_step_s / self.roofline_s:.1f}x"),
                  f"{eager.decode_step_s / self.roofline_s:.1f}x"]
        if h:
            same = sum(a == b for a, b in zip(e.first_tokens, h.first_tokens))
            cells.append(f"{same}/{len(h.first_tokens)}")
        else:
            cells.append(no)
        return cells


HEADER = ["batch", "engine prefill tok/s", "hf prefill tok/s", "prefill speedup",
          "graphs step ms", "eager step ms", "hf step ms", "graphs decode tok/s",
          "eager decode tok/s", "hf decode tok/s", "decode speedup", "step MB",
          "roofline step ms", "graphs x roofline", "eager x roofline", "same first token"]


@dataclass
class PrefillRow:
    tokens: int
    seconds: float
    flops: float
    gemm_peak: float
    """bf16 GEMM flop/s measured in this run."""

    def cells(self) -> list[str]:
        rate = self.flops / self.seconds
        return [str(self.tokens), f"{self.seconds * 1e3:.1f}",
                f"{self.tokens / self.seconds:,.0f}", f"{self.flops / 1e12:.2f}",
                f"{rate / 1e12:.1f}", f"{self.gemm_peak / 1e12:.1f}",
                f"{100 * rate / self.gemm_peak:.0f}%"]


PREFILL_HEADER = ["prompt tokens", "prefill ms", "prefill tok/s", "model TFLOP",
                  "model TFLOP/s", "bf16 GEMM TFLOP/s", "% of bf16 GEMM"]


def table(rows: list, header: list[str] = HEADER) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row.cells()) + " |" for row in rows]


def versions() -> str:
    import transformers
    import triton

    # Without these transformers runs its Mamba2 layers on its pure-torch fallback.
    kernels = ", ".join(f"{name} {'present' if importlib.util.find_spec(name) else 'absent'}"
                        for name in ("mamba_ssm", "causal_conv1d"))
    return (f"torch {torch.__version__}, triton {triton.__version__}, "
            f"transformers {transformers.__version__} ({kernels}), "
            f"Python {sys.version.split()[0]}")


def verdict(rows: list[Row]) -> str:
    row = next((r for r in rows if r.batch == TARGET_BATCH and r.hf), None)
    if row is None:
        return f"Target (decode >= {TARGET_SPEEDUP:g}x transformers at batch {TARGET_BATCH}): " \
               "not measured in this run."
    speedup = row.hf.decode_step_s / row.engine.decode_step_s
    met = "met" if speedup >= TARGET_SPEEDUP else "NOT met"
    return (f"Target (decode >= {TARGET_SPEEDUP:g}x transformers at batch {TARGET_BATCH}): "
            f"{speedup:.1f}x, {met}.")


def roofline_verdict(rows: list[Row], weights: str) -> str:
    limit = TARGET_ROOFLINE[weights]
    what = f"Target (batch-1 decode step within {limit:g}x of the {weights} roofline, graphs)"
    row = next((r for r in rows if r.batch == 1), None)
    if row is None:
        return f"{what}: not measured in this run."
    if not row.graphs:
        return f"{what}: not measured in this run (no CUDA graphs on this device)."
    ratio = row.engine.decode_step_s / row.roofline_s
    return f"{what}: {ratio:.1f}x, {'met' if ratio <= limit else 'NOT met'}."


def prefill_verdict(prefill: PrefillRow | None) -> str:
    if prefill is None:
        return "Prefill against the bf16 GEMM rate: not measured in this run."
    rate = prefill.flops / prefill.seconds
    return (f"Prefill at {prefill.tokens} tokens: {prefill.tokens / prefill.seconds:,.0f} "
            f"tokens/s, {rate / 1e12:.1f} TFLOP/s = {100 * rate / prefill.gemm_peak:.0f}% of "
            f"the bf16 GEMM rate ({prefill.gemm_peak / 1e12:.1f} TFLOP/s measured here); "
            "reported, no target.")


@dataclass
class Run:
    """What a run measured besides the rows."""

    device_name: str
    hbm: float
    gemm_peak: float
    parity: float
    parity_against: str
    parity_limit: float
    graphs: bool
    buckets: list[str] = field(default_factory=list)
    """(kind, batch) of every captured CUDA graph."""


def report(rows: list[Row], prefill: PrefillRow | None, args, info: Run, config: dict,
           sizes: Sizes) -> str:
    moe = sizes.expert_bytes[0] if sizes.expert_bytes else (0, 0, 0)
    graphs = (f"CUDA graphs replayed per batch-size bucket (captured: "
              f"{', '.join(info.buckets) or 'none'})" if info.graphs else
              "no CUDA graphs on this device (the kernels' path needs CUDA): the graphs "
              "columns say n/a")
    hf_weights = (" transformers runs the bf16 checkpoint of the same random weights."
                  if args.weights == "nvfp4" else "")
    lines = [
        f"# Engine throughput on {info.device_name} ({args.weights} weights)",
        "",
        f"Date: {datetime.date.today().isoformat()}. {versions()}.",
        f"Command: `python benchmarks/engine/bench_engine.py {' '.join(args.argv)}`.",
        "",
        f"Model: random {'smoke' if args.smoke else 'Nemotron-3-Nano-shaped'} checkpoint, "
        f"pattern {config['hybrid_override_pattern']}, hidden {config['hidden_size']}, vocab "
        f"{config['vocab_size']}, {config['n_routed_experts']} experts top-"
        f"{config['num_experts_per_tok']}, {args.dtype} activations, {args.weights} weights."
        f"{hf_weights} Weights: "
        f"{sizes.dense_bytes / 1e6:,.1f} MB dense (all but the embedding and routed experts), "
        f"{len(sizes.expert_bytes)} MoE layers of {moe[1]} x {moe[0] / 1e6:,.2f} MB experts; "
        f"state {sizes.slot_bytes / 2**20:,.2f} MiB per sequence, KV "
        f"{sizes.kv_token_bytes / 1024:,.2f} KiB per token.",
        f"Prompts: {args.prompt_len} random tokens; {args.decode_steps} timed decode steps; "
        f"engine max_batch_tokens {args.max_batch_tokens}; greedy. Engine: {graphs}.",
        f"Measured here: HBM {info.hbm / 1e9:,.1f} GB/s (device-to-device copy, read + "
        f"write), bf16 GEMM {info.gemm_peak / 1e12:,.1f} TFLOP/s. Logits parity engine vs "
        f"{info.parity_against}: relative error {info.parity:.2e} (median over the prompt's "
        f"positions; limit {info.parity_limit:g}).",
        "",
        *table(rows),
        "",
        *(table([prefill], PREFILL_HEADER) if prefill is not None else []),
        "",
        roofline_verdict(rows, args.weights),
        "",
        verdict(rows),
        "",
        prefill_verdict(prefill),
        "",
        "Formulas: see the script's docstring (speedups are transformers time / engine time; "
        "x roofline is the engine's step time / the bytes-over-bandwidth floor).",
    ]
    return "\n".join(lines) + "\n"


def figures(rows: list[Row], prefill: PrefillRow | None, info: Run, config: dict,
            args) -> dict:
    """Every measured figure, in base units, for other tools (e.g. a replica profile)."""
    def phases(p: Phases | None) -> dict | None:
        return None if p is None else {"prefill_seconds": p.prefill_s,
                                       "decode_step_seconds": p.decode_step_s}

    return {
        "device": info.device_name, "hbm_bytes_per_second": info.hbm,
        "bf16_gemm_flops_per_second": info.gemm_peak, "logits_parity": info.parity,
        "logits_parity_against": info.parity_against, "cuda_graphs": info.graphs,
        "captured_graphs": info.buckets, "weights": args.weights,
        "pattern": config["hybrid_override_pattern"], "dtype": args.dtype,
        "prompt_len": args.prompt_len, "decode_steps": args.decode_steps,
        "rows": [{"batch": r.batch, "engine": phases(r.engine), "eager": phases(r.eager),
                  "transformers": phases(r.hf),
                  "transformers_note": r.hf_note if r.hf is None else None,
                  "step_bytes": r.step_bytes, "roofline_step_seconds": r.roofline_s}
                 for r in rows],
        "prefill": None if prefill is None else {
            "tokens": prefill.tokens, "seconds": prefill.seconds, "flops": prefill.flops},
    }
