"""baton's engine on the CPU, eager against compiled, MTP off and on, against transformers'
generate() (and llama.cpp when llama-cpp-python is installed and a GGUF is given), in one
process on the same checkpoint and the same threads.

    python benchmarks/engine/bench_cpu.py [--checkpoint examples/demo] [--threads 1]
        [--batches 1,16,64] [--prompt-len 256] [--decode-steps 16] [--prefill 1024,4096]
        [--mtp 0,2] [--rounds 2] [--gguf FILE] [--out DIR]
    python benchmarks/engine/bench_cpu.py --smoke --out DIR    # tiny sizes, a minute

Every figure is fp32 on torch's CPU path (load_model kernels="torch"). The checkpoint is
copied with max_position_embeddings raised to what the longest case needs (the model has no
positional encoding: the field only bounds the engine), so 4k prompts run on the demo model.

Variants, each measured once per round, rounds interleaved (every variant of a case runs
before the next round of it, so load on the host falls on all of them alike); a figure is
the best of the rounds:
  eager       Engine(EngineConfig(compile=False)): today's step, eager torch ops;
  compiled    Engine(EngineConfig(compile=True)): the decode (and MTP verify/draft) step of
              each batch-size bucket as one torch.compile'd function (inductor, C++/OpenMP),
              compiled while the engine is built (the compile time is reported); the
              buckets are the measured batch sizes (EngineConfig.step_buckets);
  +mtp        the same with speculative_tokens (MTP drafts verified in the next step);
  hf          transformers NemotronHForCausalLM.generate(), greedy, its own KV/SSM cache;
  llama.cpp   llama_cpp.Llama on --gguf (batch 1 decode and prefill only).
Decode at batch B: B prompts of --prompt-len random tokens prefilled, then --decode-steps
engine steps timed with all B sequences decoding (nobody finishes inside the window);
tokens/s = tokens emitted in the window / its time (MTP steps emit 1 + accepted drafts).
transformers: one generate(1 + N) timed token by token (bench_engine.hf_round). Prefill at
L tokens: one prompt of L tokens to its first token (one engine step: max_batch_tokens is
the longest L), best of the rounds; transformers: generate(max_new_tokens=1).

Op counts of one batch-1 decode step (the main model's forward and its logits): eager aten
ops as a TorchDispatchMode sees them, compiled kernel calls as the profiler sees them with
inductor's kernel profiling on (generated C++ kernels and library calls such as GEMMs).

Targets (issue 28): batch-1 decode >= 3x today's baton (eager) and >= 0.5x llama.cpp;
batch 16 and 64 >= 2x transformers; prefill at 4k >= 1x transformers. The table goes to
stdout and to DIR/<date>-cpu-step.md, every figure to the .json beside it, with the device,
versions, threads and the load averages before and after.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import DeviceSync, hf_round, load_hf, parse_batches

from baton.workers.engine import Engine, EngineConfig, Request, SamplingParams
from baton.workers.model import ForwardBatch, load_model

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = 16
SYNC = DeviceSync(torch.device("cpu"))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=ROOT / "examples" / "demo")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--prefill", default="1024,4096")
    p.add_argument("--mtp", default="0,2", help="speculative_tokens values (0: MTP off)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--gguf", type=Path, default=None,
                   help="the checkpoint as a GGUF file, for the llama.cpp column")
    p.add_argument("--no-hf", action="store_true", help="leave transformers out")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--smoke", action="store_true",
                   help="batches 1,2, 32-token prompts, 4 steps, prefill 64, one round")
    args = p.parse_args(argv)
    if args.smoke:
        args.batches, args.prompt_len, args.decode_steps = "1,2", 32, 4
        args.prefill, args.rounds = "64", 1
    args.batches = parse_batches(args.batches)
    args.prefill = parse_batches(args.prefill)
    args.mtp = [int(k) for k in str(args.mtp).split(",") if k.strip()]
    for name in ("threads", "prompt_len", "decode_steps", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if any(k < 0 for k in args.mtp):
        p.error(f"--mtp: speculative_tokens must be >= 0, got {args.mtp}")
    return args


def long_enough(src: Path, length: int, into: Path) -> Path:
    """src, or a copy of it whose max_position_embeddings is at least `length`."""
    config = json.loads((src / "config.json").read_text())
    if int(config["max_position_embeddings"]) >= length:
        return src
    dst = into / "checkpoint"
    shutil.copytree(src, dst)
    config["max_position_embeddings"] = length
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


# ---------------------------------------------------------------------------- baton


def engine_for(model, args, k: int, compile_: bool, max_len: int) -> Engine:
    seqs = max(args.batches)
    pages = -(-max_len // PAGE)
    return Engine(model, EngineConfig(
        page_size=PAGE, num_pages=(seqs + 1) * pages, max_num_seqs=seqs,
        max_batch_tokens=max(max(args.prefill), 512), max_model_len=max_len,
        speculative_tokens=k, base_seed=0, compile=compile_, prefix_cache=False,
        step_buckets=sorted(set(args.batches))))


def decode_round(engine: Engine, prompts: list[list[int]], steps: int, tag: str) -> dict:
    """Prefill the prompts, then time `steps` engine steps with every sequence decoding."""
    batch, k = len(prompts), engine.config.speculative_tokens
    budget = steps * (1 + k) + 8 + -(-batch * len(prompts[0]) // engine.config.max_batch_tokens)
    ids = [f"{tag}-{i}" for i in range(batch)]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(Request(rid, list(prompt), SamplingParams(
            max_tokens=budget, temperature=0.0, ignore_eos=True)))
    started: set[str] = set()
    while len(started) < batch:
        for ev in engine.step():
            if ev.token_id is not None:
                started.add(ev.request_id)
    engine.step()  # every sequence decoding from here
    tokens = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        events = engine.step()
        if any(ev.finished for ev in events):
            raise RuntimeError(f"{tag}: a sequence finished inside the timed window")
        tokens += sum(1 for ev in events if ev.token_id is not None)
    seconds = time.perf_counter() - t0
    for rid in ids:
        engine.abort(rid)
    while engine.has_work():
        engine.step()
    return {"tokens_per_s": tokens / seconds, "tokens_per_step": tokens / steps / batch}


def prefill_round(engine: Engine, prompt: list[int], tag: str) -> float:
    engine.add_request(Request(tag, list(prompt), SamplingParams(max_tokens=1,
                                                                 temperature=0.0)))
    t0 = time.perf_counter()
    while engine.has_work():
        engine.step()
    return time.perf_counter() - t0


def count_ops(model, args) -> dict:
    """Per batch-1 decode step (forward + logits): eager aten ops, compiled kernel calls."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from baton.workers.model.graphs import StepGraphs, StepKind

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    context = args.prompt_len
    table = torch.arange(-(-(context + 2) // PAGE), dtype=torch.int32)[None]
    out = {}
    for name in ("eager", "compiled"):
        cache = model.allocate_cache(table.shape[1] + 1, PAGE, 2)
        prompt = torch.randint(5, model.config.vocab_size, (context,))
        model.forward_batch(ForwardBatch(prompt, torch.arange(context), [context], [0], table,
                                         torch.tensor([0])), cache)
        step = ForwardBatch(torch.tensor([7]), torch.tensor([context]), [1], [context], table,
                            torch.tensor([0]))
        if name == "eager":
            with Count() as mode:
                model.compute_logits(model.forward_batch(step, cache))
            out["eager_aten_ops"] = mode.n
            continue
        with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
            graphs = StepGraphs(model, cache, max_num_seqs=1, compile=True)
            graphs.warm_up([StepKind.DECODE])
            graphs.forward_batch(step)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) \
                    as prof:
                graphs.forward_batch(step)
        # The compiled module's calls: its generated kernels (cpp_fused_*) and the library
        # calls between them; the staging copies of the host part are not the step.
        events = [e for e in prof.events() if e.cpu_parent is not None
                  and e.cpu_parent.name.startswith("## Call CompiledFxGraph")]
        out["compiled_kernel_calls"] = len(events)
        out["compiled_generated_kernels"] = sum(1 for e in events
                                                if "cpp_fused" in e.name)
    return out


# ---------------------------------------------------------------------------- others


def hf_prefill(model, prompt: list[int]) -> float:
    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1,
                   do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0


class LlamaCpp:
    def __init__(self, path: Path, threads: int, n_ctx: int):
        import llama_cpp

        self.version = llama_cpp.__version__
        self.llm = llama_cpp.Llama(model_path=str(path), n_threads=threads,
                                   n_threads_batch=threads, n_ctx=n_ctx, n_batch=n_ctx,
                                   n_ubatch=n_ctx, verbose=False)

    def decode(self, prompt: list[int], steps: int) -> float:
        self.llm.reset()
        self.llm.eval(prompt)
        token = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
        t0 = time.perf_counter()
        for _ in range(steps):
            self.llm.eval([token])
            token = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
        return steps / (time.perf_counter() - t0)

    def prefill(self, prompt: list[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(prompt)
        return time.perf_counter() - t0


# ---------------------------------------------------------------------------- main


def versions() -> dict:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version()}
    try:
        import llama_cpp

        out["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        pass
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inductor's C++ kernels
    load_before = os.getloadavg()
    k_max = max(args.mtp)
    max_len = max(args.prompt_len + args.decode_steps * (1 + k_max) + 64,
                  max(args.prefill) + 16)
    max_len = -(-max_len // PAGE) * PAGE
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = long_enough(args.checkpoint, max_len, Path(tmp))
        model = load_model(path, dtype=torch.float32, kernels="torch")
        vocab = int(model.config.vocab_size)
        hf = None if args.no_hf else load_hf(path, torch.float32, torch.device("cpu"))
    llama = None
    if args.gguf is not None:
        llama = LlamaCpp(args.gguf, args.threads, max_len)

    engines: dict[str, Engine] = {}
    compile_seconds: dict[str, float] = {}
    for k in args.mtp:
        for compile_ in (False, True):
            name = ("compiled" if compile_ else "eager") + (f"+mtp{k}" if k else "")
            t0 = time.perf_counter()
            engines[name] = engine_for(model, args, k, compile_, max_len)
            if compile_:
                compile_seconds[name] = time.perf_counter() - t0
                print(f"{name}: compiled in {compile_seconds[name]:.1f} s", flush=True)

    ops = count_ops(model, args)
    print(f"ops per batch-1 decode step: {ops}", flush=True)

    decode: dict[int, dict[str, dict]] = {}
    prefill: dict[int, dict[str, float]] = {}
    for batch in args.batches:
        prompts = torch.randint(5, vocab, (batch, args.prompt_len), generator=gen).tolist()
        best: dict[str, dict] = {}
        for r in range(args.rounds):
            for name, engine in engines.items():
                got = decode_round(engine, prompts, args.decode_steps, f"{name}-{batch}-{r}")
                if name not in best or got["tokens_per_s"] > best[name]["tokens_per_s"]:
                    best[name] = got
            if hf is not None:
                phases = hf_round(hf, prompts, args.decode_steps, SYNC, torch.device("cpu"))
                tps = batch / phases.decode_step_s
                best["hf"] = {"tokens_per_s": max(tps, best.get("hf", {}).get(
                    "tokens_per_s", 0.0)), "tokens_per_step": 1.0}
            if llama is not None and batch == 1:
                tps = llama.decode(prompts[0], args.decode_steps)
                best["llama.cpp"] = {"tokens_per_s": max(tps, best.get("llama.cpp", {}).get(
                    "tokens_per_s", 0.0)), "tokens_per_step": 1.0}
        decode[batch] = best
        print(f"decode batch {batch}: " + ", ".join(
            f"{n} {v['tokens_per_s']:.1f} tok/s" for n, v in best.items()), flush=True)
    first = next(iter(engines))
    compiled_name = "compiled" if "compiled" in engines else first
    for length in args.prefill:
        prompt = torch.randint(5, vocab, (length,), generator=gen).tolist()
        best_s: dict[str, float] = {}
        for r in range(args.rounds):
            for name in (first, compiled_name):
                s = prefill_round(engines[name], prompt, f"prefill-{name}-{length}-{r}")
                best_s[name] = min(s, best_s.get(name, float("inf")))
            if hf is not None:
                best_s["hf"] = min(hf_prefill(hf, prompt), best_s.get("hf", float("inf")))
            if llama is not None:
                best_s["llama.cpp"] = min(llama.prefill(prompt),
                                          best_s.get("llama.cpp", float("inf")))
        prefill[length] = {n: length / s for n, s in best_s.items()}
        print(f"prefill {length}: " + ", ".join(
            f"{n} {v:.0f} tok/s" for n, v in prefill[length].items()), flush=True)

    load_after = os.getloadavg()
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": f"CPU: {cpu_name()} ({os.cpu_count()} cores visible)",
        "threads": args.threads, "versions": versions(),
        "checkpoint": str(args.checkpoint), "prompt_len": args.prompt_len,
        "decode_steps": args.decode_steps, "rounds": args.rounds,
        "load_average_before": load_before, "load_average_after": load_after,
        "compile_seconds": compile_seconds, "ops_per_decode_step_batch1": ops,
        "decode_tokens_per_s": {str(b): v for b, v in decode.items()},
        "prefill_tokens_per_s": {str(n): v for n, v in prefill.items()},
    }
    text = report(result, engines, args)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}-cpu-step{'-smoke' if args.smoke else ''}"
    (args.out / f"{stem}.md").write_text(text + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


def report(result: dict, engines: dict, args) -> str:
    names = [*engines, *[n for n in ("hf", "llama.cpp")
                         if any(n in v for v in result["decode_tokens_per_s"].values())]]
    lines = [f"# baton on the CPU: eager vs compiled step ({result['date']})", "",
             f"{result['device']}, {result['threads']} thread(s); "
             + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
             f"load averages before {tuple(round(x, 2) for x in result['load_average_before'])}"
             f", after {tuple(round(x, 2) for x in result['load_average_after'])}",
             f"checkpoint {result['checkpoint']}, fp32, prompts of {args.prompt_len} tokens, "
             f"{args.decode_steps} timed steps, best of {args.rounds} interleaved rounds", "",
             "## Decode tokens/s (tokens per sequence per step)", "",
             "| batch | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for batch, row in result["decode_tokens_per_s"].items():
        cells = [f"{row[n]['tokens_per_s']:.1f} ({row[n]['tokens_per_step']:.2f})"
                 if n in row else "—" for n in names]
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    pre_names = sorted({n for v in result["prefill_tokens_per_s"].values() for n in v})
    lines += ["", "## Prefill tokens/s", "", "| tokens | " + " | ".join(pre_names) + " |",
              "|---|" + "---|" * len(pre_names)]
    for length, row in result["prefill_tokens_per_s"].items():
        lines.append(f"| {length} | " + " | ".join(f"{row[n]:.0f}" if n in row else "—"
                                                     for n in pre_names) + " |")
    ops = result["ops_per_decode_step_batch1"]
    lines += ["", f"Ops per batch-1 decode step: eager {ops['eager_aten_ops']} aten ops; "
              f"compiled {ops['compiled_kernel_calls']} kernel calls "
              f"({ops['compiled_generated_kernels']} generated C++ kernels). Compile at start: "
              + ", ".join(f"{n} {s:.0f} s" for n, s in result["compile_seconds"].items()), "",
              "## Targets (issue 28)", ""]
    dec = result["decode_tokens_per_s"]

    def ratio(batch: str, a: str, b: str) -> float | None:
        row = dec.get(batch, {})
        return row[a]["tokens_per_s"] / row[b]["tokens_per_s"] if a in row and b in row \
            else None

    def verdict(label: str, value: float | None, target: float) -> str:
        if value is None:
            return f"- {label}: not measured"
        met = "met" if value >= target else "MISSED"
        return f"- {label}: {value:.2f}x (target {target}x) {met}"

    lines.append(verdict("batch-1 compiled vs eager", ratio("1", "compiled", "eager"), 3))
    lines.append(verdict("batch-1 compiled vs llama.cpp", ratio("1", "compiled", "llama.cpp"),
                         0.5))
    for batch in ("16", "64"):
        lines.append(verdict(f"batch-{batch} compiled vs transformers",
                             ratio(batch, "compiled", "hf"), 2))
    pre = result["prefill_tokens_per_s"].get("4096", {})
    ours = max((v for n, v in pre.items() if n not in ("hf", "llama.cpp")), default=None)
    lines.append(verdict("prefill 4k vs transformers",
                         ours / pre["hf"] if ours and "hf" in pre else None, 1))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
