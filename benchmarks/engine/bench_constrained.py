"""Per-token cost of grammar-constrained decoding and of the sampling penalties, as a ratio to
unconstrained decoding in the same run.

    python benchmarks/engine/bench_constrained.py [--batches 1,16,64] [--decode-steps 24]
        [--rounds 5] [--temperature 0] [--shapes small|nano] [--device cpu|cuda] [--out DIR]
    python benchmarks/engine/bench_constrained.py --smoke --out DIR     # seconds, CPU

Model: a random checkpoint, bf16 on a GPU and fp32 on the CPU: --shapes small (shapes.SMOKE
with the Nano's 131072-token vocabulary: a cheap forward, so the ratio is the pessimistic
one) or nano (shapes.NANO, the Nano's per-layer shapes; the default on a GPU). Tokenizer: a
synthetic byte-level BPE of the same 131072 tokens (letter-syllable merges, up to 16 bytes),
because what a mask costs is a walk over the vocabulary's token trie: a toy vocabulary would
hide it. --smoke: the shipped tiny shapes (vocab 512) and a 2048-token vocabulary.

Modes, per batch size B (B prompts of --prompt-len random tokens; greedy by default, since
with --temperature > 0 the CPU's step is mostly the sampler's counter-based noise over the
whole vocabulary, which hides what the constraint costs; seeded otherwise):
  plain       no constraint
  json        a JSON Schema (an array of objects with bounded integers, enums, free strings,
              nested arrays; compact whitespace) with minItems large enough that no request
              completes inside the timed window
  json+len    the same with maxLength on every string (the issue's acceptance schema has
              them): the lexer then counts characters, which makes the mask of a string's
              first token a full walk of the trie
  penalties   presence 0.5, frequency 0.5, repetition 1.2 and a 3-token logit_bias
Each round runs every mode once, in turn (plain, json, json+len, penalties; --rounds rounds
after one untimed warm-up round): B requests are added, prefilled untimed, then
--decode-steps engine.step() calls are timed, in each of which all B requests decode one
token (what a client sees as the inter-token latency). The table gives the best (lowest)
round's step time per mode (other processes on a shared machine only ever add time), its
ratio to plain, and the time llguidance spent filling masks per constrained token (on the
helper thread, overlapped with the forward: it costs a step only where it exceeds the
forward; mean over the timed steps of the best round). Target (issue 11): json <= 1.10x plain
at batch 16.
Output: the table on stdout and DIR/<date>-<device>-constrained.md with a .json beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import NANO, SMOKE

from baton.workers.engine import Engine, EngineConfig, Request, SamplingParams
from baton.workers.model import load_model
from baton.workers.model.checkpoint import write_random_checkpoint

RESULTS = Path(__file__).resolve().parents[1] / "results"
TARGET_BATCH, TARGET_RATIO = 16, 1.10
MODES = ("plain", "json", "json+len", "penalties")
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
EOS = 4


def item_schema(max_length: bool) -> dict:
    def text(n: int) -> dict:
        return {"type": "string", "maxLength": n} if max_length else {"type": "string"}

    return {
        "type": "object",
        "properties": {
            "name": text(12),
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "color": {"enum": ["red", "green", "blue"]},
            "tags": {"type": "array", "items": text(6), "maxItems": 3},
            "address": {"type": "object",
                        "properties": {"city": text(10),
                                       "zip": {"type": "integer", "minimum": 10000,
                                               "maximum": 99999}},
                        "required": ["city", "zip"], "additionalProperties": False},
        },
        "required": ["name", "age", "color", "tags", "address"],
        "additionalProperties": False,
    }


def grammar(max_length: bool, min_items: int) -> str:
    from llguidance import LLMatcher

    schema = {"type": "array", "items": item_schema(max_length), "minItems": min_items}
    return LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})


def synthetic_tokenizer(vocab_size: int, seed: int = 0):
    """A byte-level BPE `tokenizers.Tokenizer` of exactly vocab_size tokens: the specials,
    the 256 byte symbols, then merges of word-like pieces (a token is a left piece, which may
    start with the space marker, plus a short lowercase piece), as real vocabularies are."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    rng = random.Random(seed)
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    lefts = letters + [c.upper() for c in letters]
    pieces = list(letters)
    merges = []
    for c in [*letters, *(c.upper() for c in letters)]:
        vocab["Ġ" + c] = len(vocab)
        merges.append(("Ġ", c))
        lefts.append("Ġ" + c)
    while len(vocab) < vocab_size:
        a, b = rng.choice(lefts), rng.choice(pieces)
        token = a + b
        if token in vocab or len(token) > 16:
            continue
        vocab[token] = len(vocab)
        merges.append((a, b))
        lefts.append(token)
        if len(token) <= 4 and token.islower():
            pieces.append(token)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def sampling(mode: str, seed: int, max_tokens: int, grammars: dict[str, str],
             temperature: float = 0.0) -> SamplingParams:
    common = dict(max_tokens=max_tokens, temperature=temperature, seed=seed, ignore_eos=True)
    if mode == "plain":
        return SamplingParams(**common)
    if mode == "penalties":
        return SamplingParams(**common, presence_penalty=0.5, frequency_penalty=0.5,
                              repetition_penalty=1.2, logit_bias={11: 2.0, 12: -3.0, 13: 1.0})
    return SamplingParams(**common, grammar=grammars[mode])


@dataclass
class Timing:
    step_s: float
    mask_s_per_token: float


def one_round(engine: Engine, mode: str, prompts: list[list[int]], steps: int,
              grammars: dict[str, str], sync, tag: str, temperature: float = 0.0) -> Timing:
    batch = len(prompts)
    ids = [f"{tag}-{i}" for i in range(batch)]
    for i, (rid, prompt) in enumerate(zip(ids, prompts)):
        engine.add_request(Request(rid, prompt, sampling(mode, i, 4 * steps + 64, grammars,
                                                         temperature)))
    started: set[str] = set()
    while len(started) < batch:
        for ev in engine.step():
            if ev.token_id is not None:
                started.add(ev.request_id)
    masks = engine.runner.logits.masks
    mask0 = masks.seconds_total
    sync()
    t0 = time.perf_counter()
    for step in range(steps):
        events = engine.step()
        got = sum(1 for ev in events if ev.token_id is not None)
        if got != batch or any(ev.finished for ev in events):
            raise RuntimeError(f"{tag}: step {step} gave {got} tokens for a batch of {batch} "
                               "(a request ended inside the timed window)")
    sync()
    step_s = (time.perf_counter() - t0) / steps
    mask_s = masks.seconds_total - mask0
    for rid in ids:
        engine.abort(rid)
    while engine.has_work():
        engine.step()
    return Timing(step_s, mask_s / (steps * batch) if mode.startswith("json") else 0.0)


@dataclass
class Row:
    batch: int
    step_s: dict[str, float]
    mask_us: dict[str, float]

    def ratio(self, mode: str) -> float:
        return self.step_s[mode] / self.step_s["plain"]

    def cells(self) -> list[str]:
        cells = [str(self.batch)]
        for mode in MODES:
            cells.append(f"{self.step_s[mode] * 1e3:.2f}")
            if mode != "plain":
                cells.append(f"{self.ratio(mode):.2f}x")
        cells += [f"{self.mask_us['json']:.0f}", f"{self.mask_us['json+len']:.0f}"]
        return cells


HEADER = ["batch", "plain ms/step", "json ms/step", "json ratio", "json+len ms/step",
          "json+len ratio", "penalties ms/step", "penalties ratio",
          "json mask fill us/token", "json+len mask fill us/token"]


def table(rows: list[Row]) -> list[str]:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return lines + ["| " + " | ".join(row.cells()) + " |" for row in rows]


def verdict(rows: list[Row]) -> str:
    row = next((r for r in rows if r.batch == TARGET_BATCH), None)
    if row is None:
        return (f"Target (json <= {TARGET_RATIO:.2f}x plain at batch {TARGET_BATCH}): not "
                "measured in this run.")
    ratio = row.ratio("json")
    return (f"Target (json <= {TARGET_RATIO:.2f}x plain at batch {TARGET_BATCH}): {ratio:.2f}x, "
            f"{'met' if ratio <= TARGET_RATIO else 'NOT met'} (json+len: "
            f"{row.ratio('json+len'):.2f}x).")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default=None, help="comma-separated (default 1,16,64; smoke 1,4)")
    p.add_argument("--decode-steps", type=int, default=None, help="default 24 (smoke 3)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; smoke 1)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--shapes", choices=("small", "nano"), default=None,
                   help="default: nano on a GPU, small on the CPU")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads on the CPU (default: torch's)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.argv = argv
    try:
        args.batches = [int(b) for b in (args.batches or ("1,4" if args.smoke else "1,16,64")
                                         ).split(",")]
    except ValueError:
        p.error(f"--batches: {args.batches!r} is not a comma-separated list of integers")
    if any(b < 1 for b in args.batches):
        p.error(f"--batches: {args.batches} must be >= 1")
    args.decode_steps = args.decode_steps or (3 if args.smoke else 24)
    args.rounds = args.rounds or (1 if args.smoke else 5)
    if args.decode_steps < 1 or args.rounds < 1:
        p.error("--decode-steps and --rounds must be >= 1")
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not args.smoke
                                  else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    args.shapes = args.shapes or ("nano" if args.device == "cuda" else "small")
    return args


def shown_argv(argv: list[str]) -> str:
    """The command's arguments without --out (where the report went is no result)."""
    shown, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            shown.append(a)
    return " ".join(shown)


def versions() -> str:
    import llguidance

    return (f"torch {torch.__version__}, llguidance {llguidance.__version__}, "
            f"Python {sys.version.split()[0]}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vocab = 2048 if args.smoke else 131072
    config = {**(NANO if args.shapes == "nano" else SMOKE), "vocab_size": vocab,
              "eos_token_id": EOS}
    if args.smoke:
        config.update(hidden_size=32, n_routed_experts=4, moe_intermediate_size=16,
                      moe_shared_expert_intermediate_size=16)
    t0 = time.perf_counter()
    backend = synthetic_tokenizer(vocab)
    from baton.workers.text.tokenizer import Tokenizer

    tokenizer = Tokenizer(backend, eos_token="<|im_end|>")
    tokenizer_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="bench-constrained-") as folder:
        write_random_checkpoint(folder, config, seed=0, dtype=dtype, tokenizer=False)
        model = load_model(folder, dtype=dtype, device=device, kernels="auto")
    max_batch = max(args.batches)
    steps = args.decode_steps
    min_items = 2 + 4 * steps // 40  # an item takes >= 40 tokens: none completes in time
    grammars = {"json": grammar(False, min_items), "json+len": grammar(True, min_items)}
    max_len = args.prompt_len + 4 * steps + 64 + 8
    engine = Engine(model, EngineConfig(
        page_size=16, num_pages=max_batch * (-(-max_len // 16)) + 8, max_num_seqs=max_batch,
        max_batch_tokens=max(2048, max_batch * args.prompt_len), max_model_len=max_len,
        base_seed=0, eos_token_ids=[EOS]), grammar_tokenizer=tokenizer)
    t0 = time.perf_counter()
    for g in grammars.values():  # the tokenizer's trie and both grammars, untimed
        engine.runner.logits.grammars.compile(g)
    compile_s = time.perf_counter() - t0

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    gen = torch.Generator().manual_seed(1)
    load_before = os.getloadavg()[0]
    rows = []
    for batch in args.batches:
        prompts = torch.randint(5, vocab, (batch, args.prompt_len), generator=gen).tolist()
        timings: dict[str, list[Timing]] = {m: [] for m in MODES}
        for r in range(args.rounds + 1):
            for mode in MODES:
                t = one_round(engine, mode, prompts, steps, grammars, sync, f"{mode}-{batch}-{r}",
                              args.temperature)
                if r > 0:  # round 0 warms up
                    timings[mode].append(t)
        best = {m: min(ts, key=lambda t: t.step_s) for m, ts in timings.items()}
        row = Row(batch, {m: t.step_s for m, t in best.items()},
                  {m: t.mask_s_per_token * 1e6 for m, t in best.items()})
        rows.append(row)
        print("| " + " | ".join(row.cells()) + " |", flush=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    how = "greedy" if not args.temperature else f"temperature {args.temperature:g}, seeded"
    lines = [
        f"# Constrained decoding cost on {device_name}",
        "",
        f"Date: {datetime.date.today().isoformat()}. {versions()}. CPU threads: torch "
        f"{torch.get_num_threads()}, {os.cpu_count()} cores; load average (1 min) "
        f"{load_before:.1f} before the timed rounds, {os.getloadavg()[0]:.1f} after (other "
        "processes' work on a shared machine shows as noise in the ratios).",
        f"Command: `python benchmarks/engine/bench_constrained.py {shown_argv(args.argv)}`.",
        "",
        f"Model: random {'smoke' if args.smoke else args.shapes} checkpoint (pattern "
        f"{config['hybrid_override_pattern']}, hidden {config['hidden_size']}, vocab {vocab}), "
        f"{str(dtype).removeprefix('torch.')} on {device.type}; synthetic byte-level BPE "
        f"tokenizer of {vocab} tokens (built in {tokenizer_s:.1f} s; llguidance tokenizer and "
        f"both grammars compiled in {compile_s:.1f} s, untimed). Prompts {args.prompt_len} "
        f"random tokens, {how}, {steps} timed full-batch decode steps per round, the best of "
        f"{args.rounds} rounds after a warm-up round.",
        "",
        *table(rows),
        "",
        verdict(rows),
        "",
        "ratio = the mode's best step time / plain's. Mask fill: llguidance's "
        "executor time per constrained token on the helper thread (overlapped with the "
        "forward pass). Modes: see the script's docstring.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{datetime.date.today().isoformat()}-{device.type}-constrained"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({
        "device": device_name, "versions": versions(), "argv": args.argv,
        "config": config, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    engine.runner.logits.masks.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
