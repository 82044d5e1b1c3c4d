"""Engine prefill and decode throughput, CUDA graphs on and off, against transformers'
generate() and the roofline.

    python benchmarks/engine/bench_engine.py [--weights bf16|nvfp4] [--batches 1,16,64]
        [--prompt-len 512] [--decode-steps 32] [--prefill-tokens 4096] [--checkpoint DIR]
        [--out DIR]
    python benchmarks/engine/bench_engine.py --smoke --out DIR     # tiny model, CPU, seconds

Model: a random Nemotron-3-Nano-shaped checkpoint (benchmarks/engine/shapes.py NANO: pattern
"MEMEM*EM", hidden 2688, vocab 131072, 128 experts top-6, intermediate 1856, shared 3712,
Mamba 64 x 64 heads, state 128, 8 groups, 32 q / 2 kv heads of 128), written once into
DIR/bf16 (and DIR/nvfp4 with --weights nvfp4: the same random weights, every linear and
expert stack quantized to NVFP4 as ModelOpt lays it out) with write_random_checkpoint.
baton's Engine loads the checkpoint of --weights (load_model, kernels "auto");
transformers' NemotronHForCausalLM.from_pretrained loads the bf16 one (it does not read
NVFP4). Before timing, logits on one prompt are compared (no cache, fp32 norm-relative
error, the median over positions): bf16 engine against transformers, NVFP4 engine against
its own torch reference path (the W4A16 dequantized weights); a failed check fails the run.

Method, per batch size B (B prompts of --prompt-len random tokens, greedy, eos ignored):
  engine   two engines on the one loaded model, graphs (decode and verify steps replayed as
           CUDA graphs per batch-size bucket) and eager (EngineConfig.enforce_eager). All B
           requests are added at once; prefill time runs from the first step until every
           request has its first token (chunked by --max-batch-tokens); then --decode-steps
           steps are timed in which all B sequences decode one token each. One untimed round
           of the same shape runs first (Triton compiles, the bucket's graph is captured).
  hf       one generate(max_new_tokens=1+N) after an untimed one, timed through a streamer
           that syncs the device as the prompt is handed over and as each token is chosen:
           prompt -> first token is the prefill time, the N steps after it the decode steps
           (min_new_tokens keeps eos from ending early).
  tokens/s prefill B * prompt_len / prefill time; decode B / step time.
  same first token  how many of the B greedy tokens after the prompts agree between the
           graphed engine and transformers (bf16 weights only: a near-tie may legitimately
           differ, so this is reported, not checked).
Prefill alone: one prompt of --prefill-tokens tokens in one step (median of 3 after one
untimed; smoke: one), tokens/s and model TFLOP/s (roofline.prefill_flops: every linear
layer, the routers, the top-k experts, causal attention) against the bf16 GEMM rate measured
in this run (an 8192^3 matmul).

Roofline of one decode step at batch B (bytes over the HBM bandwidth measured in this run
with a device-to-device copy of 2 x 1 GiB: read + write bytes / time):
  weights  every parameter byte (in the checkpoint's format) except the embedding (only B
           rows of it are read) and the routed experts, which count per MoE layer as (expert
           bytes) x E(1 - (1 - k/E)^B), the distinct experts B tokens touch under random
           routing;
  state    Mamba conv + SSM state read and written per sequence (2 x the cache's bytes per
           slot), attention KV read over the mean context of the timed steps
           (prompt_len + N/2 tokens) plus one token written, per sequence.
  x roof   measured step time / roofline time.
Targets (issue #13), printed as verdicts: the graphed batch-1 step within 2x of the bf16
roofline (bf16 weights) and within 3x of the NVFP4 one (NVFP4 weights); the graphed engine at
least 10x transformers' decode at batch 16; prefill at 4k tokens reported against the bf16
GEMM rate. The table goes to stdout and to DIR/<date>-<device>-engine[-nvfp4].md, every
figure to the .json beside it (default DIR: benchmarks/results); the rows, verdicts and
report are engine_report.py's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the CPU smoke run never launches Triton, but imports it
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_report import Phases, PrefillRow, Row, Run, figures, report
from roofline import measure_gemm_peak, measure_hbm, model_sizes, prefill_flops
from shapes import NANO, SMOKE

from baton.workers.engine import Engine, EngineConfig, Request, SamplingParams
from baton.workers.model import load_model
from baton.workers.model.checkpoint import write_random_checkpoint

RESULTS = Path(__file__).resolve().parents[1] / "results"
# Both sides compute in bf16 with different operation orders; 8 layers of random weights
# keep their logits within a few percent of each other (1.3e-2 on the smoke model), a wrong
# weight moves them by ~100%. NVFP4 against its reference: W4A16 agrees to bf16 rounding;
# Blackwell's native path also quantizes the activations to NVFP4.
PARITY_LIMIT = 5e-2
NATIVE_FP4_PARITY_LIMIT = 0.25


class DeviceSync:
    """Waits for the device's queued work, so that host clocks time what ran on it."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ---------------------------------------------------------------------------- engine side


def prefill_slack(batch: int, prompt_len: int, max_batch_tokens: int) -> int:
    """Tokens a sequence may generate before the last prompt of its batch is prefilled:
    sequences that finish their prompt early decode while the others prefill, and their
    budget leaves room for those steps so that nobody finishes inside the timed window."""
    return -(-batch * prompt_len // max_batch_tokens) + 2


def engine_round(engine: Engine, prompts: list[list[int]], decode_steps: int,
                 sync: DeviceSync, tag: str) -> Phases:
    """Prefill B prompts together, then time decode_steps full-batch decode steps."""
    batch = len(prompts)
    slack = prefill_slack(batch, len(prompts[0]), engine.config.max_batch_tokens)
    ids = [f"{tag}-{i}" for i in range(batch)]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(Request(rid, list(prompt), SamplingParams(
            max_tokens=1 + decode_steps + slack, temperature=0.0, ignore_eos=True)))
    started: dict[str, int] = {}  # request id -> its first token
    sync()
    t0 = time.perf_counter()
    while len(started) < batch:
        if not engine.has_work():
            raise RuntimeError(f"{tag}: the engine stopped before every prompt was prefilled")
        for ev in engine.step():
            if ev.token_id is not None and ev.request_id not in started:
                started[ev.request_id] = ev.token_id
    prefill_s = time.perf_counter() - t0
    tokens = 0
    t1 = time.perf_counter()
    for step in range(decode_steps):
        events = engine.step()
        got = sum(1 for ev in events if ev.token_id is not None)
        if got != batch or any(ev.finished for ev in events):
            raise RuntimeError(f"{tag}: decode step {step} gave {got} tokens for a batch of "
                               f"{batch}; the timed window must hold the whole batch")
        tokens += got
    decode_s = time.perf_counter() - t1
    for rid in ids:
        engine.abort(rid)
    while engine.has_work():
        engine.step()
    return Phases(prefill_s, decode_s / decode_steps, tokens, [started[rid] for rid in ids])


def prefill_round(engine: Engine, prompt: list[int], sync: DeviceSync, tag: str) -> float:
    """Seconds from adding one prompt to its first token (one step when it fits the token
    budget)."""
    engine.add_request(Request(tag, list(prompt), SamplingParams(max_tokens=1,
                                                                 temperature=0.0)))
    sync()
    t0 = time.perf_counter()
    while engine.has_work():
        engine.step()
    sync()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------- transformers side


def hf_round(model, prompts: list[list[int]], decode_steps: int, sync: DeviceSync,
             device: torch.device) -> Phases:
    """One generate() call timed token by token: its streamer is handed the prompt before
    the prefill and each new token as it is chosen, and syncs the device each time."""
    from transformers.generation.streamers import BaseStreamer

    class StepClock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:
            sync()
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    mask = torch.ones_like(ids)

    def generate(n: int, streamer=None):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0,
                              streamer=streamer)

    generate(2)  # warm-up (allocator, kernels)
    clock = StepClock()
    out = generate(1 + decode_steps, clock)
    expected = (len(prompts), len(prompts[0]) + 1 + decode_steps)
    if tuple(out.shape) != expected or len(clock.times) != 2 + decode_steps:
        raise RuntimeError(f"transformers generated {tuple(out.shape)} tokens in "
                           f"{len(clock.times) - 1} steps, expected {expected}")
    # times[0]: the prompt handed over; times[1]: the first token; then one per step.
    t = clock.times
    return Phases(t[1] - t[0], (t[-1] - t[1]) / decode_steps, len(prompts) * decode_steps,
                  out[:, len(prompts[0])].tolist())


def load_hf(path: Path, dtype: torch.dtype, device: torch.device):
    import transformers

    model = transformers.NemotronHForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out).float()[0]


def parity_error(ours, theirs, prompt: list[int], device: torch.device) -> float:
    """Median over positions of the norm-relative error between the two models' logits over
    one prompt (no cache, in fp32). The median, because in 16-bit a near-tie in the router
    can send one position to other experts on one side: a real difference of rounding, not
    of weights, that the other positions do not share."""
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    a, b = logits_of(ours, ids), logits_of(theirs, ids)
    if not torch.isfinite(a).all() or not torch.isfinite(b).all():
        return float("inf")
    per_position = (a - b).norm(dim=-1) / b.norm(dim=-1).clamp(min=1e-30)
    return per_position.median().item()


# ---------------------------------------------------------------------------- main


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--batches: {text!r} is not a comma-separated list of integers") \
            from None
    if not batches or any(b < 1 for b in batches):
        raise ValueError(f"--batches: {text!r} must list batch sizes >= 1")
    return batches


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default="bf16", choices=("bf16", "nvfp4"),
                   help="the engine's checkpoint format (transformers always runs bf16)")
    p.add_argument("--batches", default=None, help="comma-separated (default 1,16,64; smoke 1,3)")
    p.add_argument("--prompt-len", type=int, default=None, help="default 512 (smoke 24)")
    p.add_argument("--decode-steps", type=int, default=None, help="default 32 (smoke 4)")
    p.add_argument("--prefill-tokens", type=int, default=None,
                   help="the prefill-alone prompt (default 4096; smoke 48; 0 skips it)")
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="folder holding the bf16/ (and nvfp4/) checkpoints to reuse (written "
                        "there when missing)")
    p.add_argument("--skip-hf", action="store_true", help="engine only (no transformers)")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the results file")
    args = p.parse_args(argv)
    args.argv = argv
    try:
        args.batches = parse_batches(args.batches or ("1,3" if args.smoke else "1,16,64"))
    except ValueError as err:
        p.error(str(err))
    args.prompt_len = args.prompt_len or (24 if args.smoke else 512)
    args.decode_steps = args.decode_steps or (4 if args.smoke else 32)
    if args.prefill_tokens is None:
        args.prefill_tokens = 48 if args.smoke else 4096
    for name in ("prompt_len", "decode_steps", "max_batch_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: {getattr(args, name)} must be >= 1")
    if args.prefill_tokens < 0:
        p.error(f"--prefill-tokens: {args.prefill_tokens} must be >= 0")
    if args.prefill_tokens > args.max_batch_tokens:
        p.error(f"--prefill-tokens: {args.prefill_tokens} must fit one step "
                f"(--max-batch-tokens {args.max_batch_tokens})")
    if not args.smoke and not torch.cuda.is_available():
        p.error("needs a CUDA device (or --smoke)")
    return args


def ensure_checkpoint(folder: Path, config: dict, dtype: torch.dtype,
                      quantization: str | None = None) -> Path:
    """Writes the random checkpoint unless `folder` already holds this exact architecture
    (and quantization)."""
    config_file = folder / "config.json"
    quantized = (folder / "hf_quant_config.json").exists()
    if config_file.exists() and list(folder.glob("*.safetensors")) and \
            quantized == (quantization is not None):
        held = json.loads(config_file.read_text())
        if all(held.get(k) == v for k, v in config.items()):
            return folder
    t0 = time.perf_counter()
    write_random_checkpoint(folder, config, seed=0, dtype=dtype, quantization=quantization,
                            tokenizer=False)
    print(f"wrote the random {quantization or 'bf16'} checkpoint to {folder} in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = getattr(torch, args.dtype)
    config = SMOKE if args.smoke else NANO
    max_len = max(args.prefill_tokens + 1, args.prompt_len + 1 + args.decode_steps +
                  prefill_slack(max(args.batches), args.prompt_len, args.max_batch_tokens))
    if max_len > config["max_position_embeddings"]:
        raise SystemExit(f"--prompt-len + --decode-steps (+ steps while the batch prefills), "
                         f"or --prefill-tokens: {max_len} tokens exceed the model's "
                         f"{config['max_position_embeddings']}")
    device_name = "cpu" if args.smoke else torch.cuda.get_device_name(device)
    torch.manual_seed(0)
    scratch = None
    if args.checkpoint is None:
        scratch = tempfile.TemporaryDirectory(prefix="bench-engine-")
        args.checkpoint = Path(scratch.name)
    try:
        bf16 = ensure_checkpoint(args.checkpoint / "bf16", config, dtype)
        weights = bf16 if args.weights == "bf16" else ensure_checkpoint(
            args.checkpoint / "nvfp4", config, dtype, quantization="nvfp4")
        return run(args, weights, bf16, config, device, dtype, device_name)
    finally:
        if scratch is not None:
            scratch.cleanup()


def engine_for(model, args, max_model_len: int, num_seqs: int, eager: bool) -> Engine:
    pages_per_seq = -(-max_model_len // 16)
    return Engine(model, EngineConfig(
        page_size=16, num_pages=num_seqs * pages_per_seq + pages_per_seq,
        max_num_seqs=num_seqs, max_batch_tokens=args.max_batch_tokens,
        max_model_len=max_model_len, base_seed=0, enforce_eager=eager, prefix_cache=False))


def check_parity(args, model, path: Path, hf, prompt: list[int], device, dtype
                 ) -> tuple[float, str, float]:
    """(error, against what, limit): bf16 against transformers, NVFP4 against its own torch
    reference path."""
    if args.weights == "bf16":
        if hf is None:
            return float("nan"), "transformers (skipped)", PARITY_LIMIT
        return parity_error(model, hf, prompt, device), "transformers", PARITY_LIMIT
    reference = load_model(path, dtype=dtype, device=device, kernels="torch")
    error = parity_error(model, reference, prompt, device)
    del reference
    native = any(type(m).__name__ == "Nvfp4NativeLinear" for m in model.modules())
    return error, "its torch reference path", NATIVE_FP4_PARITY_LIMIT if native \
        else PARITY_LIMIT


def run(args, path: Path, hf_path: Path, config: dict, device: torch.device,
        dtype: torch.dtype, device_name: str) -> int:
    hbm = measure_hbm(device, args.smoke)
    gemm_peak = measure_gemm_peak(device, args.smoke)
    sync = DeviceSync(device)
    gen = torch.Generator().manual_seed(1)
    vocab = config["vocab_size"]
    prompts = {b: torch.randint(5, vocab, (b, args.prompt_len), generator=gen).tolist()
               for b in args.batches}

    model = load_model(path, dtype=dtype, device=device, kernels="auto")
    hf = None if args.skip_hf else load_hf(hf_path, dtype, device)
    parity, against, limit = check_parity(args, model, path, hf, prompts[args.batches[0]][0],
                                          device, dtype)
    print(f"HBM {hbm / 1e9:,.1f} GB/s, bf16 GEMM {gemm_peak / 1e12:,.1f} TFLOP/s; logits "
          f"parity against {against} {parity:.2e}", flush=True)

    largest = max(args.batches)
    max_model_len = args.prompt_len + 1 + args.decode_steps + prefill_slack(
        largest, args.prompt_len, args.max_batch_tokens)
    # The warm-up round runs the timed round's prompts: without the prefix cache, so that the
    # timed prefill computes them instead of finding them cached (engine_for turns it off).
    graphed = engine_for(model, args, max_model_len, largest, eager=False)
    step_graphs = graphed.runner.step_graphs
    graphs = step_graphs is not None and step_graphs.capture
    # Without graphs (no CUDA) the first engine already runs eagerly: it is measured once.
    eager = engine_for(model, args, max_model_len, largest, eager=True) if graphs else None
    sizes = model_sizes(model, graphed)
    context = args.prompt_len + args.decode_steps / 2

    rows = []
    for b in args.batches:
        measured = {}
        for name, engine in [("graphs", graphed), *([("eager", eager)] if eager else [])]:
            engine_round(engine, prompts[b], min(args.decode_steps, 4), sync, f"warm{b}")
            measured[name] = engine_round(engine, prompts[b], args.decode_steps, sync,
                                          f"{name}{b}")
        measured.setdefault("eager", measured["graphs"])
        theirs, hf_note = None, "-"
        if hf is not None:
            try:
                with torch.no_grad():
                    theirs = hf_round(hf, prompts[b], args.decode_steps, sync, device)
            except torch.OutOfMemoryError:
                # Without mamba_ssm, transformers' torch Mamba2 prefill holds per-chunk
                # intermediates that grow with the batch: large batches may not fit.
                hf_note = "OOM"
                torch.cuda.empty_cache()
        step_bytes = sizes.step_bytes(b, context)
        rows.append(Row(b, measured["graphs"], theirs, step_bytes / hbm, step_bytes,
                        args.prompt_len, hf_note, eager=measured["eager"], graphs=graphs))
        print(" | ".join(rows[-1].cells()), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    buckets = [f"{kind.value} {n}" for kind, n in step_graphs.captured] if graphs else []
    del graphed, eager, hf
    if device.type == "cuda":
        torch.cuda.empty_cache()

    prefill = None
    if args.prefill_tokens:
        engine = engine_for(model, args, args.prefill_tokens + 1, 1, eager=True)
        prompt = torch.randint(5, vocab, (args.prefill_tokens,), generator=gen).tolist()
        prefill_round(engine, prompt, sync, "prefill-warm")
        times = sorted(prefill_round(engine, prompt, sync, f"prefill{i}")
                       for i in range(1 if args.smoke else 3))
        prefill = PrefillRow(args.prefill_tokens, times[len(times) // 2],
                             prefill_flops(model, args.prefill_tokens), gemm_peak)
        print(" | ".join(prefill.cells()), flush=True)

    info = Run(device_name, hbm, gemm_peak, parity, against, limit, graphs, buckets)
    text = report(rows, prefill, args, info, config, sizes)
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    suffix = "" if args.weights == "bf16" else f"-{args.weights}"
    out = args.out / f"{datetime.date.today().isoformat()}-{slug}-engine{suffix}.md"
    failed = not parity <= limit if not math.isnan(parity) else False
    if failed:
        text += (f"\nFAILED CHECK: logits parity {parity:.2e} > {limit:g}: the engine and "
                 f"{against} do not run the same model.\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(figures(
        rows, prefill, info, config, args), indent=1, allow_nan=True) + "\n")
    print(text)
    print(f"written to {out} and .json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
