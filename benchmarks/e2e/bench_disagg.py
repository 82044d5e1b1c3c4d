"""Disaggregated against aggregated serving, end to end: TTFT and ITL under mixed load.

    python benchmarks/e2e/bench_disagg.py [--long-rates 0.5,1,2,4] [--modes disagg,agg]
        [--duration 20] [--checkpoint DIR] [--out DIR]
    python benchmarks/e2e/bench_disagg.py --smoke --out DIR     # tiny model, CPU, seconds

Model: a random Nemotron-3-Nano-shaped checkpoint (benchmarks/engine/shapes.py NANO), written
once with its tokenizer; the engine dtype is "auto" (bf16 on a GPU).

Modes, each started once as real processes on this machine and fed every rate in turn:
  disagg      `baton up` on a generated Model YAML: a prefill worker, a decode worker (on
              the same GPU, its memory split by baton up) and the router; prompts run on the
              prefill worker and their state crosses to the decode worker over gRPC.
  disagg-mps  the same under a private CUDA MPS control daemon started for the run
              (nvidia-cuda-mps-control -d with its own pipe directory), so that the two
              workers' kernels share the GPU's SMs instead of taking time slices.
  agg         benchmarks/e2e/aggregated.py: the same router front end over one in-process
              EngineLoop that chunks prompts into the running decode batch (the decode
              worker's engine settings).

Load (loadgen.py), per long-prompt rate: open-loop arrivals for --duration seconds of long
prompts (--long-len tokens, 4096) at that rate and short prompts (--short-len, 256) at
--short-rate, every request generating --output-len tokens (eos ignored, greedy), streamed
through /v1/completions with httpx; the same seeded schedule in every mode. Untimed first:
one long and one short request alone, then a burst of short ones (Triton compiles), then
six check requests sent together whose greedy tokens (with top-2 logprobs) are compared
with the first mode's: equal wherever the top-1/top-2 margin exceeds 1e-3.
Reported: TTFT p50/p90/p99 (all requests, and p99 per kind), ITL p50/p90/p99 (every gap
between consecutive tokens), output tokens/s. Any failed request fails the run; requests
still running --drain seconds after a rate's last arrival are cut off and counted apart (the
rate overloads the mode). The table goes to stdout, the report to
DIR/<date>-<device>-disagg.md and every figure to the .json beside it (default DIR:
benchmarks/results). The default rates are first guesses for the 8-layer Nano slice on an
H100: raise them until the aggregated TTFT or ITL breaks away.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "engine")]
import loadgen  # noqa: E402
from services import MPS_BINARY, PrivateMps, Service, mps_note  # noqa: E402
from shapes import NANO, SMOKE  # noqa: E402

from baton.workers.local import free_port  # noqa: E402

RESULTS = HERE.parent / "results"
MODES = ("disagg", "disagg-mps", "agg")
SERVED_NAME = "bench"
# Greedy tokens must agree across modes wherever the top-1/top-2 margin exceeds this (the
# project's rule for comparing batchings in fp32; in bf16 the report only states the count).
CHECK_MARGIN = 1e-3


# ---------------------------------------------------------------------------- setup


def model_yaml(checkpoint: Path, max_model_len: int, max_batch_tokens: int,
               max_concurrency: int) -> str:
    """The Model resource both modes serve (baton up reads it; agg reads its WorkerConfig)."""
    pool = "      - {name: local, minReplicas: 1, maxReplicas: 1}\n"
    return (
        "apiVersion: baton.dev/v1alpha1\n"
        "kind: Model\n"
        f"metadata: {{name: {SERVED_NAME}, namespace: default}}\n"
        "spec:\n"
        f"  source: {{uri: 'file://{checkpoint.resolve()}'}}\n"
        "  quantization: auto\n"
        f"  engine: {{maxModelLen: {max_model_len}, kvPageSize: 16, dtype: auto}}\n"
        "  router: {routing: least-loaded, requestTimeoutSeconds: 900,\n"
        "           transferTimeoutSeconds: 120, maxQueuedRequests: 4096}\n"
        "  prefill:\n"
        f"    maxBatchTokens: {max_batch_tokens}\n"
        f"    pools:\n{pool}"
        "  decode:\n"
        f"    maxConcurrency: {max_concurrency}\n"
        "    speculativeTokens: 0\n"
        f"    pools:\n{pool}"
        "  autoscaling: {enabled: false}\n"
    )


def ensure_checkpoint(folder: Path, config: dict) -> Path:
    """Writes the random checkpoint (with tokenizer) unless `folder` holds this architecture."""
    import torch

    from baton.workers.model.checkpoint import write_random_checkpoint

    config_file = folder / "config.json"
    if (config_file.exists() and list(folder.glob("*.safetensors"))
            and (folder / "tokenizer.json").exists()):
        held = json.loads(config_file.read_text())
        if all(held.get(k) == v for k, v in config.items()):
            return folder
    t0 = time.monotonic()
    write_random_checkpoint(folder, config, seed=0, dtype=torch.bfloat16, tokenizer=True)
    print(f"wrote the random checkpoint to {folder} in {time.monotonic() - t0:.0f} s",
          flush=True)
    return folder


def start_mode(mode: str, spec_path: Path, config_path: Path, run_dir: Path,
               env: dict[str, str]) -> Service:
    port = free_port()
    python = sys.executable
    if mode.startswith("disagg"):
        argv = [python, "-m", "baton.workers.cli", "up", str(spec_path), "--port", str(port),
                "--run-dir", str(run_dir / mode), "--ready-timeout", "1200"]
    else:
        argv = [python, str(HERE / "aggregated.py"), "--config", str(config_path),
                "--port", str(port)]
    return Service(mode, argv, env, run_dir / f"{mode}.log", port)


# ---------------------------------------------------------------------------- report


HEADER = ["mode", "long req/s", "short req/s", "requests (long + short)", "failed", "cut off",
          "TTFT p50 s", "TTFT p90 s", "TTFT p99 s", "short TTFT p99 s", "long TTFT p99 s",
          "ITL p50 ms", "ITL p90 ms", "ITL p99 ms", "output tok/s"]


def _s(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3f}"


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 1e3:.1f}"


def row_cells(s: loadgen.Summary, short_rate: float) -> list[str]:
    return [s.mode, f"{s.long_rate:g}", f"{short_rate:g}",
            f"{s.sent['long']} + {s.sent['short']}", str(s.failed), str(s.cut_off),
            *map(_s, s.ttft), _s(s.ttft_by_kind["short"][2]), _s(s.ttft_by_kind["long"][2]),
            *map(_ms, s.itl), f"{s.output_tokens_per_s:,.1f}"]


def table(summaries: list[loadgen.Summary], short_rate: float) -> list[str]:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return lines + ["| " + " | ".join(row_cells(s, short_rate)) + " |" for s in summaries]


def versions() -> str:
    import torch
    import triton

    return f"torch {torch.__version__}, triton {triton.__version__}, " \
           f"Python {sys.version.split()[0]}"


def report(args, summaries, device_name: str, ready: dict[str, float], skipped: list[str],
           config: dict, failures: list[str], agreed: dict[str, dict]) -> str:
    lines = [
        f"# Disaggregated vs aggregated serving on {device_name}",
        "",
        f"Date: {datetime.date.today().isoformat()}. {versions()}.",
        f"Command: `python benchmarks/e2e/bench_disagg.py {' '.join(args.argv)}`.",
        "",
        f"Model: random {'smoke' if args.smoke else 'Nemotron-3-Nano-shaped'} checkpoint, "
        f"pattern {config['hybrid_override_pattern']}, hidden {config['hidden_size']}, "
        f"{config['n_routed_experts']} experts top-{config['num_experts_per_tok']}; engine "
        f"dtype auto; decode maxConcurrency {args.max_concurrency}, prefill maxBatchTokens "
        f"{args.max_batch_tokens}, no speculative decoding.",
        f"Load: {args.arrivals} arrivals for {args.duration:g} s per rate; long prompts "
        f"{args.long_len} tokens, short prompts {args.short_len} tokens at "
        f"{args.short_rate:g}/s; {args.output_len} output tokens each (greedy, eos ignored); "
        f"seed {args.seed}; streamed through /v1/completions.",
        f"MPS: {mps_note(args.smoke)}.",
        "Time to ready (process start to /ready): "
        + ", ".join(f"{m} {t:.1f} s" for m, t in ready.items()) + ".",
        *([f"Skipped: {'; '.join(skipped)}."] if skipped else []),
        *(["Greedy tokens of the check requests (two long and four short prompts sent "
           "together, untimed), equal wherever the top-1/top-2 margin exceeds "
           f"{CHECK_MARGIN:g}: " + ", ".join(
               f"{m} {a['agree']}/{a['compared']} as {a['reference']}"
               for m, a in agreed.items()) + "."] if agreed else []),
        "",
        *table(summaries, args.short_rate),
        "",
        "TTFT: send to first streamed token per request. ITL: every gap between consecutive "
        "tokens of a request, pooled. Both modes serve through the same router front end; "
        "see the script's docstring.",
    ]
    errors = [f"- {m}" for m in failures]
    errors += [f"- {s.mode} at {s.long_rate:g}/s: {e}" for s in summaries for e in s.errors]
    if errors:
        lines += ["", "FAILED (modes that did not run; first distinct request errors):",
                  *errors]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- main


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise ValueError(f"--long-rates: {text!r} is not a comma-separated list of numbers") \
            from None
    if not rates or any(not (r > 0 and math.isfinite(r)) for r in rates):
        raise ValueError(f"--long-rates: {text!r} must list rates > 0 (requests per second)")
    return rates


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise ValueError(f"--modes: {text!r} must list some of {', '.join(MODES)}")
    return list(dict.fromkeys(modes))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="disagg,agg", help=f"comma-separated: {', '.join(MODES)}")
    p.add_argument("--long-rates", default=None, help="long prompts per second, one run each "
                   "(default 0.5,1,2,4; smoke 1)")
    p.add_argument("--short-rate", type=float, default=None, help="default 4 (smoke 2)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds of arrivals per rate (default 20; smoke 1.5)")
    p.add_argument("--drain", type=float, default=None,
                   help="seconds after a rate's last arrival before requests still running "
                        "are cut off and counted apart (default 60)")
    p.add_argument("--long-len", type=int, default=None, help="default 4096 (smoke 96)")
    p.add_argument("--short-len", type=int, default=None, help="default 256 (smoke 8)")
    p.add_argument("--output-len", type=int, default=None, help="default 128 (smoke 5)")
    p.add_argument("--max-concurrency", type=int, default=None, help="default 64 (smoke 8)")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="default 8192 (smoke 256)")
    p.add_argument("--arrivals", default=None, choices=("poisson", "uniform"),
                   help="default poisson (smoke uniform)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint folder to reuse (written there when it holds none)")
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the results files")
    args = p.parse_args(argv)
    args.argv = argv
    smoke = args.smoke
    defaults = {"short_rate": 2.0 if smoke else 4.0, "duration": 1.5 if smoke else 20.0,
                "drain": 60.0,
                "long_len": 96 if smoke else 4096, "short_len": 8 if smoke else 256,
                "output_len": 5 if smoke else 128, "max_concurrency": 8 if smoke else 64,
                "max_batch_tokens": 256 if smoke else 8192,
                "arrivals": "uniform" if smoke else "poisson"}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        args.long_rates = parse_rates(args.long_rates or ("1" if smoke else "0.5,1,2,4"))
        args.modes = parse_modes(args.modes)
    except ValueError as err:
        p.error(str(err))
    for name in ("long_len", "short_len", "output_len", "max_concurrency", "max_batch_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: {getattr(args, name)} must be >= 1")
    if not (args.short_rate >= 0 and math.isfinite(args.short_rate)):
        p.error(f"--short-rate: {args.short_rate} must be a number >= 0")
    if not args.duration > 0:
        p.error(f"--duration: {args.duration} must be > 0")
    if not args.drain > 0:
        p.error(f"--drain: {args.drain} must be > 0")
    return args


def device_name(smoke: bool) -> str:
    if smoke:
        return "cpu"
    # Asked from a short-lived process: a CUDA context here would hold GPU memory for the
    # whole run, memory that baton up splits between the workers.
    probe = ("import sys, torch\n"
             "if not torch.cuda.is_available(): sys.exit('torch sees no CUDA device')\n"
             "print(torch.cuda.get_device_name(0))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120)
    if out.returncode != 0:
        why = (out.stderr.strip().splitlines() or ["the probe failed"])[-1]
        raise SystemExit(f"bench_disagg: needs a CUDA device (or --smoke): {why}")
    return out.stdout.strip()


def warm_up(service: Service, args, workload: loadgen.Workload) -> None:
    """Untimed: one long and one short request alone (kernels compile for both prompt
    lengths), then a burst of short ones together (and for the batch sizes decode meets)."""
    alone = loadgen.schedule(dataclasses.replace(
        workload, long_rate=1.0, short_rate=1.0, duration_s=1.0, arrivals="uniform",
        seed=args.seed + 1))
    burst = min(args.max_concurrency, 32)
    together = loadgen.schedule(dataclasses.replace(
        workload, long_rate=0.0, short_rate=float(burst), duration_s=1.0, arrivals="uniform",
        seed=args.seed + 2))
    rounds = [[dataclasses.replace(a, at=0.0)] for a in alone]
    rounds.append([dataclasses.replace(a, at=0.0) for a in together])
    for arrivals in rounds:
        outcomes, _ = asyncio.run(loadgen.run_load(
            service.base_url, SERVED_NAME, arrivals, args.output_len,
            timeout_s=args.ready_timeout))
        failed = [o.error for o in outcomes if o.error]
        if failed:
            raise RuntimeError(f"{service.name}: warm-up request failed: {failed[0]}\n"
                               f"{service.log_tail()}")


def check_arrivals(workload: loadgen.Workload, seed: int) -> list[loadgen.Arrival]:
    """Two long and four short prompts, sent together (so they share batches)."""
    arrivals = loadgen.schedule(dataclasses.replace(
        workload, long_rate=2.0, short_rate=4.0, duration_s=1.0, arrivals="uniform", seed=seed))
    return [dataclasses.replace(a, at=0.0) for a in arrivals]


def run_checks(service: Service, args, workload: loadgen.Workload) -> list[loadgen.Outcome]:
    """Untimed: the check requests with their top-2 logprobs, for comparing the modes."""
    outcomes, _ = asyncio.run(loadgen.run_load(
        service.base_url, SERVED_NAME, check_arrivals(workload, args.seed + 3),
        args.output_len, timeout_s=args.ready_timeout, alternatives=2))
    failed = [o.error for o in outcomes if o.error]
    if failed:
        raise RuntimeError(f"{service.name}: check request failed: {failed[0]}\n"
                           f"{service.log_tail()}")
    return outcomes


def agreement(checks: dict[str, list[loadgen.Outcome]]) -> dict[str, dict]:
    """Every mode's greedy tokens against the first mode that ran."""
    if not checks:
        return {}
    reference, *others = checks
    out = {}
    for mode in others:
        agree, compared = loadgen.greedy_agreement(checks[reference], checks[mode],
                                                   CHECK_MARGIN)
        out[mode] = {"reference": reference, "agree": agree, "compared": compared}
    return out


def run_mode(mode: str, args, spec_path: Path, config_path: Path, run_dir: Path,
             workloads: list[loadgen.Workload], env: dict[str, str],
             ready: dict[str, float], summaries: list[loadgen.Summary],
             checks: dict[str, list[loadgen.Outcome]]) -> None:
    """Starts the mode, runs its check requests, feeds it every workload, stops it; each
    rate's summary is appended as it finishes, so a mode that fails later keeps the rates it
    measured."""
    service = start_mode(mode, spec_path, config_path, run_dir, env)
    try:
        ready[mode] = service.wait_ready(args.ready_timeout)
        print(f"{mode}: ready after {ready[mode]:.1f} s", flush=True)
        warm_up(service, args, workloads[0])
        checks[mode] = run_checks(service, args, workloads[0])
        for w in workloads:
            arrivals = loadgen.schedule(w)
            outcomes, wall = asyncio.run(loadgen.run_load(
                service.base_url, SERVED_NAME, arrivals, args.output_len,
                timeout_s=args.ready_timeout, drain_s=args.drain))
            summaries.append(loadgen.summarize(mode, w.long_rate, outcomes, wall))
            print(" | ".join(row_cells(summaries[-1], args.short_rate)), flush=True)
    finally:
        service.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    name = device_name(args.smoke)
    config = SMOKE if args.smoke else NANO
    max_model_len = -(-(max(args.long_len, args.short_len) + args.output_len + 1) // 16) * 16
    if max_model_len > config["max_position_embeddings"]:
        raise SystemExit(f"--long-len + --output-len: {max_model_len} tokens exceed the "
                         f"model's {config['max_position_embeddings']}")
    env = dict(os.environ, PYTHONUNBUFFERED="1", GRPC_VERBOSITY="ERROR")
    if args.smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
    workloads = [loadgen.Workload(
        long_rate=rate, short_rate=args.short_rate, duration_s=args.duration,
        long_len=args.long_len, short_len=args.short_len, output_len=args.output_len,
        vocab_size=config["vocab_size"], seed=args.seed, arrivals=args.arrivals)
        for rate in args.long_rates]

    with tempfile.TemporaryDirectory(prefix="bench-disagg-") as scratch:
        run_dir = Path(scratch)
        checkpoint = ensure_checkpoint(args.checkpoint or run_dir / "checkpoint", config)
        spec_path = run_dir / "model.yaml"
        spec_path.write_text(model_yaml(checkpoint, max_model_len, args.max_batch_tokens,
                                        args.max_concurrency))
        from baton.operator.spec import Model, worker_config
        from baton.workers.local import load_model_spec

        model: Model = load_model_spec(spec_path)
        config_path = run_dir / "worker-config.json"
        config_path.write_text(worker_config(model, str(checkpoint)).to_json())

        summaries: list[loadgen.Summary] = []
        ready: dict[str, float] = {}
        skipped: list[str] = []
        failures: list[str] = []
        checks: dict[str, list[loadgen.Outcome]] = {}
        for mode in args.modes:
            if mode == "disagg-mps" and (args.smoke or shutil.which(MPS_BINARY) is None):
                skipped.append(f"disagg-mps ({MPS_BINARY} not available on this machine)"
                               if not args.smoke else "disagg-mps (no GPU in a smoke run)")
                continue
            try:
                if mode == "disagg-mps":
                    with PrivateMps() as mps_env:
                        run_mode(mode, args, spec_path, config_path, run_dir, workloads,
                                 {**env, **mps_env}, ready, summaries, checks)
                else:
                    run_mode(mode, args, spec_path, config_path, run_dir, workloads, env,
                             ready, summaries, checks)
            except (RuntimeError, OSError, subprocess.SubprocessError) as err:
                # The other modes still run and the report keeps what was measured.
                print(f"bench_disagg: {mode} failed: {err}", file=sys.stderr)
                lines = [line for line in str(err).splitlines() if line.strip()] or [repr(err)]
                # The first line says what failed; the last, from the log, usually why.
                failures.append(f"{mode}: {lines[0]}"
                                + (f" ... {lines[-1].strip()}" if len(lines) > 1 else ""))

    agreed = agreement(checks)
    text = report(args, summaries, name, ready, skipped, config, failures, agreed)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    stem = f"{datetime.date.today().isoformat()}-{slug}-disagg"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(text)
    figures = {"device": name, "modes": args.modes, "skipped": skipped,
               "failures": failures, "ready_s": ready, "agreement": agreed,
               "workload": {k: getattr(args, k) for k in (
                   "short_rate", "duration", "drain", "long_len", "short_len", "output_len",
                   "max_concurrency", "max_batch_tokens", "arrivals", "seed")},
               "runs": [dataclasses.asdict(s) for s in summaries]}
    (args.out / f"{stem}.json").write_text(json.dumps(figures, indent=1, allow_nan=True) + "\n")
    print(text)
    print(f"written to {args.out / (stem + '.md')} and .json")
    return 1 if failures or any(s.failed for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
