"""NVFP4 MoE and W4A16 GEMM kernels against bf16 torch and the bf16 roofline (GPU).

    python benchmarks/kernels/bench_moe.py [--what moe,gemm] [--tokens 1,8,...] [--out FILE]
    python benchmarks/kernels/bench_moe.py --smoke --out smoke.md   # tiny shapes, CPU

Shapes: the Nemotron 3 Nano MoE (hidden 2688, 128 experts, top-6, intermediate 1856) and a
Nemotron 3 Super-like LatentMoE (experts in the latent width 1024 of hidden 4096, 512
experts, top-22, intermediate 2688), T = 1 ... 8192 tokens; the dense W4A16 GEMMs of the
same models (Nano shared expert, Super latent projections).

Method. The run first measures its own ceilings: HBM read bandwidth (a bf16 sum over 2 GiB)
and bf16 dense GEMM rate (cuBLAS, 8192^3). Each case is checked against the torch reference
(QuantExperts / QuantLinear with backend "torch": fp32 math on the dequantized weights) on
fresh random data before it is timed, and a failed check fails the run. Timing uses CUDA
events around CUDA-graph replays (and, reported beside, the same calls launched one by one);
each timed call uses another routing and, where the weights are small, another weight copy,
the rotation touching more than 200 MB so that no figure measures the 50 MB L2.

Formulas (activations are left out of the bytes; weights dominate):
  weight bytes   NVFP4 expert = 2 * I * K * (1/2 + 1/16) + 8; bf16 expert = 2 * I * K * 2;
                 counted over the distinct experts a call's routing touches
  flops          MoE: 4 * T * top_k * I * K; GEMM: 2 * M * N * K
  GB/s           weight bytes / time;  % HBM = GB/s / measured HBM read GB/s
  bf16 roofline  max(bf16 weight bytes / HBM read, flops / measured bf16 GEMM rate)
  speedups       (a) bf16 torch time / our time (same calls launched one by one: a
                 per-expert torch loop for the MoE, cuBLAS for the GEMM);
                 (b) bf16 roofline / our time
The table goes to stdout and to benchmarks/results/<date>-<device>-moe.md.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # the CPU smoke run needs the interpreter, set before import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from baton.kernels import QuantExperts, QuantLinear, route, set_backend

ROTATION_BYTES = 220e6  # more than 4x the H100's 50 MB L2
TOKENS = (1, 8, 32, 128, 512, 2048, 8192)


@dataclass(frozen=True)
class MoEShape:
    name: str
    width: int  # the experts' in/out width (the latent width in a LatentMoE)
    experts: int
    top_k: int
    intermediate: int


MOE_SHAPES = (
    MoEShape("nano", 2688, 128, 6, 1856),
    MoEShape("super-latent", 1024, 512, 22, 2688),
)
GEMM_SHAPES = (  # (name, out_features N, in_features K)
    ("nano shared up", 3712, 2688),
    ("nano shared down", 2688, 3712),
    ("super latent fc1", 1024, 4096),
    ("super latent fc2", 4096, 1024),
)
SMOKE_MOE = (MoEShape("smoke", 64, 8, 2, 32),)
SMOKE_GEMM = (("smoke", 48, 64),)


class Clock:
    """Per-call time of a rotation of calls: CUDA events over graph replays or launches."""

    def __init__(self, device: torch.device, reps: int):
        self.device, self.reps = device, reps

    def time(self, calls, graph: bool) -> float:
        """Median seconds per call."""
        for call in calls:  # compile and warm up outside the timed region
            call()
        if self.device.type != "cuda":
            times = []
            for _ in range(self.reps):
                start = time.perf_counter()
                for call in calls:
                    call()
                times.append((time.perf_counter() - start) / len(calls))
            return statistics.median(times)
        run = self._graph(calls) if graph else (lambda: [call() for call in calls])
        run()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / len(calls))
        return statistics.median(times)

    @staticmethod
    def _graph(calls):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for call in calls:
                call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in calls:
                call()
        return graph.replay


def measure_ceilings(device: torch.device, clock: Clock, smoke: bool) -> tuple[float, float]:
    """(HBM read bytes/s, bf16 GEMM flop/s), measured here."""
    elements = (1 << 20) if smoke else (1 << 30)  # 2 GiB of bf16 on the GPU
    buf = torch.randn(elements, device=device).bfloat16()
    read = clock.time([lambda: buf.sum(dtype=torch.float32)], graph=False)
    n = 256 if smoke else 8192
    a = torch.randn(n, n, device=device).bfloat16()
    b = torch.randn(n, n, device=device).bfloat16()
    mm = clock.time([lambda: a @ b], graph=False)
    return buf_bytes(elements) / read, 2 * n ** 3 / mm


def buf_bytes(elements: int) -> int:
    return elements * 2


def expert_bytes(shape: MoEShape, fmt: str) -> float:
    i, k = shape.intermediate, shape.width
    if fmt == "bf16":
        return 2 * i * k * 2
    return 2 * i * k * (0.5 + 1 / 16) + 8


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return math.inf
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30)).item()


@dataclass
class Row:
    case: str
    tokens: int
    fmt: str
    graph_s: float
    launch_s: float
    weight_bytes: float
    flops: float
    torch_bf16_s: float
    roofline_s: float
    error: float

    def cells(self, hbm: float, peak: float) -> list[str]:
        gbps = self.weight_bytes / self.graph_s / 1e9
        return [self.case, str(self.tokens), self.fmt, f"{self.graph_s * 1e6:.1f}",
                f"{self.launch_s * 1e6:.1f}", f"{self.weight_bytes / 1e6:.1f}", f"{gbps:.0f}",
                f"{100 * gbps * 1e9 / hbm:.0f}%", f"{self.flops / self.graph_s / 1e12:.1f}",
                f"{self.torch_bf16_s / self.launch_s:.2f}x",
                f"{self.roofline_s / self.graph_s:.2f}x", f"{self.error:.1e}"]


HEADER = ["case", "T", "format", "time us (graph)", "time us (launches)", "weight MB",
          "GB/s", "% HBM", "TFLOP/s", "vs bf16 torch", "vs bf16 roofline", "rel err"]


class MoECase:
    """One MoE shape's experts, built once: the format under test (with copies to rotate
    through when one copy is smaller than the rotation) and bf16 for the baselines."""

    def __init__(self, shape: MoEShape, fmt: str, device: torch.device, rotation_bytes: float):
        self.shape, self.fmt, self.device = shape, fmt, device
        self.rotation_bytes = rotation_bytes
        copies = max(1, math.ceil(rotation_bytes / (expert_bytes(shape, fmt) * shape.experts)))
        self.modules = []
        for c in range(copies):
            up, down = self._float_weights(seed=c)
            self.modules.append(QuantExperts.from_float(up, down, fmt, torch.bfloat16))
            if c == 0:
                self.bf16_up, self.bf16_down = up.bfloat16(), down.bfloat16()
            del up, down

    def _float_weights(self, seed: int):
        e, i, k = self.shape.experts, self.shape.intermediate, self.shape.width
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return (torch.randn(e, i, k, device=self.device, generator=gen) / k ** 0.5,
                torch.randn(e, k, i, device=self.device, generator=gen) / i ** 0.5)

    def torch_bf16_moe(self, x, ids, weights):
        """The baseline: a per-expert bf16 torch loop (as transformers runs NemotronH)."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        hit = torch.zeros(self.shape.experts, dtype=torch.int64, device=x.device)
        hit.index_add_(0, ids.reshape(-1), torch.ones_like(ids.reshape(-1)))
        for e in torch.nonzero(hit).flatten().tolist():
            token, slot = torch.where(ids == e)
            h = torch.relu(F.linear(x[token], self.bf16_up[e])).square()
            y = F.linear(h, self.bf16_down[e]) * weights[token, slot, None]
            out.index_add_(0, token, y.float())
        return out.to(x.dtype)


def bench_moe(case: MoECase, tokens: int, clock: Clock, hbm: float, peak: float,
              failures: list[str]) -> Row:
    shape, fmt, device = case.shape, case.fmt, case.device
    gen = torch.Generator(device=device).manual_seed(1000 + tokens)

    def routing():
        logits = torch.randn(tokens, shape.experts, device=device, generator=gen)
        weights, ids = route(logits, None, shape.top_k)
        x = torch.randn(tokens, shape.width, device=device, generator=gen).bfloat16()
        return x, ids, weights

    # Check first, on fresh data: the Triton path against the torch reference.
    module = case.modules[0]
    x, ids, weights = routing()
    set_backend(module, "torch")
    ref = module(x, ids, weights)
    set_backend(module, "triton")
    error = relative_error(module(x, ids, weights), ref)
    if not error < 1e-2:
        failures.append(f"moe {shape.name} T={tokens} {fmt}: relative error {error:.2e}")
    del ref

    touched = expert_bytes(shape, fmt) * ids.unique().numel()
    rotations = max(2, min(64, math.ceil(case.rotation_bytes / touched)))
    batches = [routing() for _ in range(rotations)]
    for m in case.modules:
        set_backend(m, "triton")
    copies = len(case.modules)
    calls = [functools.partial(case.modules[r % copies], *batches[r]) for r in range(rotations)]
    graph_s = clock.time(calls, graph=True)
    launch_s = clock.time(calls, graph=False)
    weight_bytes = statistics.mean(expert_bytes(shape, fmt) * b[1].unique().numel()
                                   for b in batches)
    torch_bf16_s = clock.time([functools.partial(case.torch_bf16_moe, *b) for b in batches[:2]],
                              graph=False)
    flops = 4 * tokens * shape.top_k * shape.intermediate * shape.width
    bf16_bytes = weight_bytes / expert_bytes(shape, fmt) * expert_bytes(shape, "bf16")
    roofline_s = max(bf16_bytes / hbm, flops / peak)
    return Row(shape.name, tokens, fmt, graph_s, launch_s, weight_bytes, flops, torch_bf16_s,
               roofline_s, error)


def bench_gemm(name: str, n: int, k: int, tokens: int, device, clock: Clock, hbm: float,
               peak: float, fmt: str, failures: list[str], rotation_bytes: float) -> Row:
    per_copy = n * k * {"fp8": 1, "bf16": 2}.get(fmt, 0.5 + 1 / 16)
    copies = max(2, math.ceil(rotation_bytes / per_copy))
    layers, dense = [], []
    for _ in range(copies):
        w = torch.randn(n, k, device=device) / k ** 0.5
        layers.append(QuantLinear.from_float(w, fmt, torch.bfloat16))
        dense.append(w.bfloat16())
    x = torch.randn(tokens, k, device=device).bfloat16()
    ref = layers[0](x)
    set_backend(layers[0], "triton")
    error = relative_error(layers[0](x), ref)
    # W4A16 matches the reference to bf16 rounding; FP8 through _scaled_mm also quantizes x.
    limit = 1e-2 if fmt != "fp8" or device.type != "cuda" else 6e-2
    if not error < limit:
        failures.append(f"gemm {name} M={tokens} {fmt}: relative error {error:.2e}")
    for layer in layers:
        set_backend(layer, "triton")
    calls = [functools.partial(m, x) for m in layers]
    graph_s = clock.time(calls, graph=True)
    launch_s = clock.time(calls, graph=False)
    bf16_copies = dense[: max(2, math.ceil(rotation_bytes / (n * k * 2)))]
    torch_bf16_s = clock.time([functools.partial(F.linear, x, w) for w in bf16_copies],
                              graph=False)
    flops = 2 * tokens * n * k
    roofline_s = max(n * k * 2 / hbm, flops / peak)
    return Row(f"{name} ({n}x{k})", tokens, fmt, graph_s, launch_s, per_copy, flops,
               torch_bf16_s, roofline_s, error)


def markdown(rows: list[Row], hbm: float, peak: float, device_name: str, args) -> str:
    return markdown_report(f"MoE and W4A16 GEMM kernels on {device_name}", "bench_moe.py",
                           hbm, peak, "the torch reference",
                           HEADER, [row.cells(hbm, peak) for row in rows])


def markdown_report(title: str, script: str, hbm: float, peak: float, reference: str,
                    header: list[str], cells: list[list[str]]) -> str:
    """A dated report: versions, the command, the ceilings measured in the run, the table."""
    lines = [
        f"# {title}",
        "",
        f"Date: {datetime.date.today().isoformat()}. torch {torch.__version__}, "
        f"triton {_triton_version()}. Command: `python benchmarks/kernels/{script} "
        f"{' '.join(sys.argv[1:])}`.",
        "",
        f"Measured in this run: HBM read {hbm / 1e9:,.1f} GB/s (a bf16 sum); bf16 GEMM "
        f"{peak / 1e12:,.1f} TFLOP/s (a square bf16 matmul). Formulas: see the script's "
        f"docstring. Every row was checked against {reference} first (rel err).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def _triton_version() -> str:
    import triton

    return triton.__version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", default="moe,gemm")
    parser.add_argument("--tokens", default=None,
                        help=f"comma-separated token counts (default {TOKENS}; smoke: 1,5)")
    parser.add_argument("--formats", default="nvfp4", help="comma-separated: nvfp4, bf16, fp8")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU (Triton interpreter): checks the script")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("needs a CUDA device (or --smoke)")
    default_tokens = (1, 5) if args.smoke else TOKENS
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else list(default_tokens)
    formats = args.formats.split(",")
    clock = Clock(device, 2 if args.smoke else args.reps)
    rotation_bytes = 0.0 if args.smoke else ROTATION_BYTES
    torch.manual_seed(0)
    hbm, peak = measure_ceilings(device, clock, args.smoke)
    device_name = "cpu" if args.smoke else torch.cuda.get_device_name(device)

    rows, failures = [], []
    what = args.what.split(",")
    for fmt in formats:
        if "moe" in what and fmt != "fp8":
            for shape in SMOKE_MOE if args.smoke else MOE_SHAPES:
                case = MoECase(shape, fmt, device, rotation_bytes)
                for t in tokens:
                    rows.append(bench_moe(case, t, clock, hbm, peak, failures))
                    print(" | ".join(rows[-1].cells(hbm, peak)), flush=True)
                del case
                _free(device)
        if "gemm" in what:
            for name, n, k in SMOKE_GEMM if args.smoke else GEMM_SHAPES:
                for t in tokens:
                    rows.append(bench_gemm(name, n, k, t, device, clock, hbm, peak, fmt,
                                           failures, rotation_bytes))
                    print(" | ".join(rows[-1].cells(hbm, peak)), flush=True)
                    _free(device)

    return write_report(markdown(rows, hbm, peak, device_name, args), failures, device_name,
                        "moe", args.out)


def write_report(report: str, failures: list[str], device_name: str, what: str,
                 out: Path | None) -> int:
    """Prints the report and writes it (failed checks appended) to `out` or to
    benchmarks/results/<date>-<device>-<what>.md; the exit status: 1 if a check failed."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    out = out or (Path(__file__).resolve().parents[1] / "results"
                  / f"{datetime.date.today().isoformat()}-{slug}-{what}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + ("\nFAILED CHECKS:\n" + "\n".join(failures) + "\n"
                             if failures else ""))
    print(report)
    print(f"written to {out}")
    for failure in failures:
        print("FAILED:", failure, file=sys.stderr)
    return 1 if failures else 0


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
