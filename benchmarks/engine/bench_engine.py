"""Engine prefill and decode throughput against transformers' generate() and the HBM roofline.

    python benchmarks/engine/bench_engine.py [--batches 1,16,64] [--prompt-len 512]
        [--decode-steps 32] [--checkpoint DIR] [--out DIR]
    python benchmarks/engine/bench_engine.py --smoke --out DIR     # tiny model, CPU, seconds

Model: a random Nemotron-3-Nano-shaped checkpoint (benchmarks/engine/shapes.py NANO: pattern
"MEMEM*EM", hidden 2688, vocab 131072, 128 experts top-6, intermediate 1856, shared 3712,
Mamba 64 x 64 heads, state 128, 8 groups, 32 q / 2 kv heads of 128), bf16, written once with
write_random_checkpoint and loaded by both sides: baton's Engine (load_model, kernels
"auto") and transformers' NemotronHForCausalLM.from_pretrained. Before timing, the two
models' logits on one prompt are compared (no cache, fp32 norm-relative error) so that both
sides provably run the same weights; a failed check fails the run.

Method, per batch size B (B prompts of --prompt-len random tokens, greedy, eos ignored):
  engine   all B requests are added at once; prefill time runs from the first step until
           every request has its first token (chunked by --max-batch-tokens); then
           --decode-steps steps are timed in which all B sequences decode one token each.
           One untimed round of the same shape runs first (Triton compiles and tunes).
  hf       one generate(max_new_tokens=1+N) after an untimed one, timed through a streamer
           that syncs the device as the prompt is handed over and as each token is chosen:
           prompt -> first token is the prefill time, the N steps after it the decode steps
           (min_new_tokens keeps eos from ending early).
  tokens/s prefill B * prompt_len / prefill time; decode B / step time.
  same first token  how many of the B greedy tokens after the prompts agree between the two
           (the engine's cached, batched path against transformers'; in 16-bit a near-tie
           may legitimately differ, so this is reported, not checked).

Roofline of one decode step at batch B (bytes over the HBM bandwidth measured in this run
with a device-to-device copy of 2 x 1 GiB: read + write bytes / time):
  weights  every parameter byte except the embedding (only B rows of it are read) and the
           routed experts, which count per MoE layer as (expert bytes) x E(1 - (1 - k/E)^B),
           the distinct experts B tokens touch under random routing;
  state    Mamba conv + SSM state read and written per sequence (2 x the cache's bytes per
           slot), attention KV read over the mean context of the timed steps
           (prompt_len + N/2 tokens) plus one token written, per sequence.
  % roof   roofline time / measured step time.
The table goes to stdout and to DIR/<date>-<device>-engine.md, every figure to the .json
beside it (default DIR: benchmarks/results). Target (issue #2): engine decode >= 10x
transformers at batch 16.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the CPU smoke run never launches Triton, but imports it
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import Sizes, measure_hbm, model_sizes
from shapes import NANO, SMOKE

from baton.workers.engine import Engine, EngineConfig, Request, SamplingParams
from baton.workers.model import load_model
from baton.workers.model.checkpoint import write_random_checkpoint

RESULTS = Path(__file__).resolve().parents[1] / "results"
TARGET_BATCH, TARGET_SPEEDUP = 16, 10.0
# Both sides compute in bf16 with different operation orders; 8 layers of random weights
# keep their logits within a few percent of each other (1.3e-2 on the smoke model), a wrong
# weight moves them by ~100%.
PARITY_LIMIT = 5e-2


class DeviceSync:
    """Waits for the device's queued work, so that host clocks time what ran on it."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ---------------------------------------------------------------------------- engine side


@dataclass
class Phases:
    prefill_s: float
    decode_step_s: float
    decode_tokens: int
    first_tokens: list[int] = field(default_factory=list)
    """The greedy token after each prompt, in prompt order."""


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


def parity_error(ours, theirs, prompt: list[int], device: torch.device) -> float:
    """Median over positions of the norm-relative error between the two models' logits over
    one prompt (no cache, in fp32). The median, because in 16-bit a near-tie in the router
    can send one position to other experts on one side: a real difference of rounding, not
    of weights, that the other positions do not share."""
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    with torch.no_grad():
        a = ours(ids).float()[0]
        b = theirs(ids).logits.float()[0]
    if not torch.isfinite(a).all() or not torch.isfinite(b).all():
        return float("inf")
    per_position = (a - b).norm(dim=-1) / b.norm(dim=-1).clamp(min=1e-30)
    return per_position.median().item()


# ---------------------------------------------------------------------------- report


@dataclass
class Row:
    batch: int
    engine: Phases
    hf: Phases | None
    roofline_s: float
    step_bytes: float
    prompt_len: int
    hf_note: str = "-"
    """What the transformers cells show when it did not run (-: skipped, OOM)."""

    def cells(self) -> list[str]:
        e, h, b, no = self.engine, self.hf, self.batch, self.hf_note
        prefill_tps = b * self.prompt_len / e.prefill_s
        decode_tps = b / e.decode_step_s
        cells = [str(b), f"{prefill_tps:,.0f}"]
        cells += ([f"{b * self.prompt_len / h.prefill_s:,.0f}",
                   f"{h.prefill_s / e.prefill_s:.1f}x"] if h else [no, no])
        cells += [f"{e.decode_step_s * 1e3:.2f}"]
        cells += [f"{h.decode_step_s * 1e3:.2f}"] if h else [no]
        cells += [f"{decode_tps:,.0f}"]
        cells += ([f"{b / h.decode_step_s:,.0f}" if h.decode_step_s else "inf",
                   f"{h.decode_step_s / e.decode_step_s:.1f}x"] if h else [no, no])
        cells += [f"{self.step_bytes / 1e6:,.1f}", f"{self.roofline_s * 1e3:.3f}",
                  f"{100 * self.roofline_s / e.decode_step_s:.0f}%"]
        if h:
            same = sum(a == b for a, b in zip(e.first_tokens, h.first_tokens))
            cells.append(f"{same}/{len(h.first_tokens)}")
        else:
            cells.append(no)
        return cells


HEADER = ["batch", "engine prefill tok/s", "hf prefill tok/s", "prefill speedup",
          "engine step ms", "hf step ms", "engine decode tok/s", "hf decode tok/s",
          "decode speedup", "step MB", "roofline step ms", "engine % of roofline",
          "same first token"]


def table(rows: list[Row]) -> list[str]:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
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


def report(rows: list[Row], args, device_name: str, hbm: float, parity: float,
           config: dict, sizes: Sizes) -> str:
    moe = sizes.expert_bytes[0] if sizes.expert_bytes else (0, 0, 0)
    lines = [
        f"# Engine throughput on {device_name}",
        "",
        f"Date: {datetime.date.today().isoformat()}. {versions()}.",
        f"Command: `python benchmarks/engine/bench_engine.py {' '.join(args.argv)}`.",
        "",
        f"Model: random {'smoke' if args.smoke else 'Nemotron-3-Nano-shaped'} checkpoint, "
        f"pattern {config['hybrid_override_pattern']}, hidden {config['hidden_size']}, vocab "
        f"{config['vocab_size']}, {config['n_routed_experts']} experts top-"
        f"{config['num_experts_per_tok']}, {args.dtype}. Weights: "
        f"{sizes.dense_bytes / 1e6:,.1f} MB dense (all but the embedding and routed experts), "
        f"{len(sizes.expert_bytes)} MoE layers of {moe[1]} x {moe[0] / 1e6:,.2f} MB experts; "
        f"state {sizes.slot_bytes / 2**20:,.2f} MiB per sequence, KV "
        f"{sizes.kv_token_bytes / 1024:,.2f} KiB per token.",
        f"Prompts: {args.prompt_len} random tokens; {args.decode_steps} timed decode steps; "
        f"engine max_batch_tokens {args.max_batch_tokens}; greedy.",
        f"Measured here: HBM {hbm / 1e9:,.1f} GB/s (device-to-device copy, read + write). "
        f"Logits parity engine vs transformers: relative error {parity:.2e} "
        f"(median over the prompt's positions; limit {PARITY_LIMIT:g}).",
        "",
        *table(rows),
        "",
        verdict(rows),
        "",
        "Formulas: see the script's docstring (speedups are transformers time / engine time; "
        "% of roofline is the bytes-over-bandwidth floor / the engine's step time).",
    ]
    return "\n".join(lines) + "\n"


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
    p.add_argument("--batches", default=None, help="comma-separated (default 1,16,64; smoke 1,3)")
    p.add_argument("--prompt-len", type=int, default=None, help="default 512 (smoke 24)")
    p.add_argument("--decode-steps", type=int, default=None, help="default 32 (smoke 4)")
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint folder to reuse (written there when it holds none)")
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
    for name in ("prompt_len", "decode_steps", "max_batch_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: {getattr(args, name)} must be >= 1")
    if not args.smoke and not torch.cuda.is_available():
        p.error("needs a CUDA device (or --smoke)")
    return args


def ensure_checkpoint(folder: Path, config: dict, dtype: torch.dtype) -> Path:
    """Writes the random checkpoint unless `folder` already holds this exact architecture."""
    config_file = folder / "config.json"
    if config_file.exists() and list(folder.glob("*.safetensors")):
        held = json.loads(config_file.read_text())
        if all(held.get(k) == v for k, v in config.items()):
            return folder
    t0 = time.perf_counter()
    write_random_checkpoint(folder, config, seed=0, dtype=dtype, tokenizer=False)
    print(f"wrote the random checkpoint to {folder} in {time.perf_counter() - t0:.0f} s",
          flush=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = getattr(torch, args.dtype)
    config = SMOKE if args.smoke else NANO
    max_len = args.prompt_len + 1 + args.decode_steps + prefill_slack(
        max(args.batches), args.prompt_len, args.max_batch_tokens)
    if max_len > config["max_position_embeddings"]:
        raise SystemExit(f"--prompt-len + --decode-steps (+ steps while the batch prefills): "
                         f"{max_len} tokens exceed the model's "
                         f"{config['max_position_embeddings']}")
    device_name = "cpu" if args.smoke else torch.cuda.get_device_name(device)
    torch.manual_seed(0)
    scratch = None
    if args.checkpoint is None:
        scratch = tempfile.TemporaryDirectory(prefix="bench-engine-")
        args.checkpoint = Path(scratch.name)
    try:
        path = ensure_checkpoint(args.checkpoint, config, dtype)
        return run(args, path, config, device, dtype, device_name)
    finally:
        if scratch is not None:
            scratch.cleanup()


def run(args, path: Path, config: dict, device: torch.device, dtype: torch.dtype,
        device_name: str) -> int:
    hbm = measure_hbm(device, args.smoke)
    sync = DeviceSync(device)
    gen = torch.Generator().manual_seed(1)
    vocab = config["vocab_size"]
    prompts = {b: torch.randint(5, vocab, (b, args.prompt_len), generator=gen).tolist()
               for b in args.batches}

    model = load_model(path, dtype=dtype, device=device, kernels="auto")
    hf = None if args.skip_hf else load_hf(path, dtype, device)
    parity = (parity_error(model, hf, prompts[args.batches[0]][0], device)
              if hf is not None else float("nan"))
    print(f"HBM {hbm / 1e9:,.1f} GB/s; logits parity {parity:.2e}", flush=True)

    largest = max(args.batches)
    max_model_len = args.prompt_len + 1 + args.decode_steps + prefill_slack(
        largest, args.prompt_len, args.max_batch_tokens)
    pages_per_seq = -(-max_model_len // 16)
    # The warm-up round runs the timed round's prompts: without the prefix cache, so that the
    # timed prefill computes them instead of finding them cached.
    engine = Engine(model, EngineConfig(
        page_size=16, num_pages=largest * pages_per_seq + pages_per_seq, max_num_seqs=largest,
        max_batch_tokens=args.max_batch_tokens, max_model_len=max_model_len, base_seed=0,
        prefix_cache=False))
    sizes = model_sizes(model, engine)
    context = args.prompt_len + args.decode_steps / 2

    rows = []
    for b in args.batches:
        engine_round(engine, prompts[b], min(args.decode_steps, 4), sync, f"warm{b}")
        ours = engine_round(engine, prompts[b], args.decode_steps, sync, f"b{b}")
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
        rows.append(Row(b, ours, theirs, step_bytes / hbm, step_bytes, args.prompt_len,
                        hf_note))
        print(" | ".join(rows[-1].cells()), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    text = report(rows, args, device_name, hbm, parity, config, sizes)
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    out = args.out / f"{datetime.date.today().isoformat()}-{slug}-engine.md"
    failed = not parity <= PARITY_LIMIT if hf is not None else False
    if failed:
        text += (f"\nFAILED CHECK: logits parity {parity:.2e} > {PARITY_LIMIT:g}: the two "
                 "sides do not run the same model.\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(figures(
        rows, device_name, hbm, parity, config, args), indent=1, allow_nan=True) + "\n")
    print(text)
    print(f"written to {out} and .json")
    return 1 if failed else 0


def figures(rows: list[Row], device_name: str, hbm: float, parity: float, config: dict,
            args) -> dict:
    """Every measured figure, in base units, for other tools (e.g. a replica profile)."""
    def phases(p: Phases | None) -> dict | None:
        return None if p is None else {"prefill_seconds": p.prefill_s,
                                       "decode_step_seconds": p.decode_step_s}

    return {
        "device": device_name, "hbm_bytes_per_second": hbm, "logits_parity": parity,
        "pattern": config["hybrid_override_pattern"], "dtype": args.dtype,
        "prompt_len": args.prompt_len, "decode_steps": args.decode_steps,
        "rows": [{"batch": r.batch, "engine": phases(r.engine), "transformers": phases(r.hf),
                  "transformers_note": r.hf_note if r.hf is None else None,
                  "step_bytes": r.step_bytes, "roofline_step_seconds": r.roofline_s}
                 for r in rows],
    }


if __name__ == "__main__":
    sys.exit(main())
