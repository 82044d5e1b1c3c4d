"""The trained demo model's figures: held-out perplexity in bf16, NVFP4 and FP8, MTP
speculation (acceptance and batch-1 decode speed at 0, 1 and 2 draft tokens, greedy outputs
identical), transformers parity, the calculator agent loop, and greedy Python completions.

    .venv/bin/python benchmarks/demo/bench_demo.py              # examples/demo, ~10 min on 2 CPUs
    .venv/bin/python benchmarks/demo/bench_demo.py --smoke --out DIR   # tiny model, seconds

Method:
  perplexity  `baton perplexity`'s scoring (windows of the model's context, half-window
              stride) over the held-out standard-library modules (tools/demo_corpus.py
              HELD_OUT: never trained on), fp32 activations: the checkpoint's bf16 weights,
              then the same checkpoint through `baton quantize --format nvfp4` and `fp8`
              (input scales calibrated on training files). Target: NVFP4 within 5% of bf16.
  speculation --prompts windows of --prompt-len tokens cut from the held-out modules, each
              decoded greedily for --max-tokens tokens (eos ignored) through baton's Engine,
              one request at a time, with speculative_tokens 0, 1 and 2. Acceptance =
              accepted / drafted MTP tokens; decode tokens/s counts the tokens after the first
              over the time after it (prefill excluded). The outputs must be identical.
              On the CPU in fp32 by default; --spec-device cuda: in bf16 through the Triton
              kernels (the rest of the benchmark stays on the CPU).
  parity      fp32 logits of transformers' NemotronHForCausalLM (which ignores mtp.*) and
              baton's on a held-out code window and a chat; max |diff| / max |logit|.
  agent       --questions held-out calculator questions (numbers no training chat holds)
              through the template-rendered prompt with tools, greedy, the tool run for real
              (tools/demo_eval.py); right = the call computes the question's expression and
              the final answer states the result.
Output: a table on stdout, DIR/2026-12-01-demo-model.md (date of the run) and a .json beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import demo_chats  # noqa: E402
import demo_corpus  # noqa: E402
import demo_eval  # noqa: E402

from baton.workers import perplexity, quantize  # noqa: E402
from baton.workers.model import load_model  # noqa: E402
from baton.workers.text.tokenizer import load_tokenizer  # noqa: E402

# Prompts end where a token ends in the training text. The tokenizer merges a newline with the
# indentation after it ("):" + "\n   " + " return"), so a prompt ending in a bare newline is a
# token the model saw only before unindented lines, and it answers with a new top-level `def`.
PYTHON_PROMPTS = [
    "def fibonacci(n):",
    "import os\n\n\ndef list_python_files(path):",
    "class Stack:\n    def __init__(self):",
    "def read_lines(filename):\n    with open(filename) as f:",
]


def held_out_texts(limit_bytes: int | None) -> list[str]:
    texts = [demo_corpus.read_source(p) for p in demo_corpus.held_out_files()]
    if limit_bytes is None:
        return texts
    return [texts[0][:limit_bytes]]


def ppl(model, tokenizer, texts) -> dict:
    window = min(model.max_model_len, 4096)
    return perplexity.perplexity(model, tokenizer, texts, window, max(1, window // 2))


def parity(path: Path, model, tokenizer, text: str) -> float:
    import transformers

    reference = transformers.NemotronHForCausalLM.from_pretrained(
        path, dtype=torch.float32).eval()
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 12 plus 30?"}], tools=[demo_chats.CALCULATOR],
        tokenize=True)
    worst = 0.0
    for ids in (tokenizer.encode(text)[:256], chat):
        with torch.no_grad():
            expected = reference(torch.tensor([ids])).logits.float()
            got = model(torch.tensor([ids]))
        worst = max(worst, float((got - expected).abs().max() / expected.abs().max()))
    return worst


def code_prompts(tokenizer, texts: list[str], count: int, length: int) -> list[list[int]]:
    ids = [i for t in texts for i in tokenizer.encode(t)]
    step = max(length, (len(ids) - length) // max(1, count))
    return [ids[s: s + length] for s in range(0, len(ids) - length, step)][:count]


def run(args) -> dict:
    started = time.monotonic()
    model_path = args.model
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, dtype=torch.float32)
    texts = held_out_texts(args.ppl_bytes)
    results: dict = {"model": str(args.model.relative_to(REPO) if args.model.is_relative_to(
        REPO) else args.model.name), "held_out_modules": list(demo_corpus.HELD_OUT)}

    print("perplexity ...", file=sys.stderr)
    figures = {"bf16": ppl(model, tokenizer, texts)}
    calibration = demo_corpus.training_files()[:args.calibration_files]
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("nvfp4", "fp8"):
            out = Path(tmp) / fmt
            quantize.quantize_checkpoint(model_path, out, fmt, calibration,
                                         progress_stream=open(os.devnull, "w"))
            quantized = load_model(out, dtype=torch.float32)
            figures[fmt] = ppl(quantized, tokenizer, texts)
            figures[fmt]["size_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            del quantized
    figures["bf16"]["size_bytes"] = sum(f.stat().st_size for f in model_path.glob("*.safetensors"))
    results["perplexity"] = figures
    results["nvfp4_ppl_ratio"] = figures["nvfp4"]["ppl"] / figures["bf16"]["ppl"]

    print("transformers parity ...", file=sys.stderr)
    results["parity_rel_err"] = parity(model_path, model, tokenizer, texts[-1])

    print("speculation ...", file=sys.stderr)
    prompts = code_prompts(tokenizer, texts, args.prompts, args.prompt_len)
    # On a GPU the model serves in bf16 through the Triton kernels, as a worker runs it.
    spec_model = model if args.spec_device == "cpu" else load_model(
        model_path, dtype=torch.bfloat16, device=args.spec_device)
    spec = demo_eval.speculation_figures(spec_model, tokenizer, prompts, args.max_tokens)
    base = spec[0]
    results["speculation"] = {
        k: {"acceptance": v["acceptance"], "drafted": v["drafted"], "accepted": v["accepted"],
            "decode_tokens_per_s": v["decode_tokens_per_s"],
            "speedup": v["decode_tokens_per_s"] / base["decode_tokens_per_s"],
            "outputs_identical": v["outputs"] == base["outputs"]}
        for k, v in spec.items()}
    results["speculation_setup"] = {"prompts": len(prompts), "prompt_len": args.prompt_len,
                                    "max_tokens": args.max_tokens,
                                    "device": spec_device_name(args.spec_device)}

    print("agent ...", file=sys.stderr)
    engine = demo_eval.make_engine(model, tokenizer, speculative_tokens=2)
    agent = []
    for question in demo_chats.held_out_questions(seed=2026, count=args.questions):
        result = demo_eval.run_agent(engine, tokenizer, question, args.agent_tokens)
        agent.append({"question": question.text, "expected": question.expression,
                      "call": result.expression, "answer": result.answer,
                      "correct": result.correct})
    results["agent"] = agent
    results["agent_correct"] = sum(a["correct"] for a in agent)

    completions = []
    for prompt in PYTHON_PROMPTS:
        ids = demo_eval.generate(engine, tokenizer.encode(prompt), args.completion_tokens)
        completions.append({"prompt": prompt, "completion": tokenizer.decode(ids)})
    results["completions"] = completions
    results["seconds"] = round(time.monotonic() - started, 1)
    results["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": __import__("transformers").__version__}
    results["device"] = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return results


def spec_device_name(device: str) -> str:
    if device == "cpu":
        return f"CPU, fp32, {torch.get_num_threads()} torch threads"
    return f"{torch.cuda.get_device_name(torch.device(device))}, bf16, Triton kernels"


def report(r: dict) -> str:
    p = r["perplexity"]
    lines = [
        f"# Demo model figures ({datetime.date.today().isoformat()})", "",
        f"Model `{r['model']}`; device {r['device']}; python {r['versions']['python']}, torch "
        f"{r['versions']['torch']}, transformers {r['versions']['transformers']}; "
        f"{r['seconds']:.0f} s. Method: benchmarks/demo/bench_demo.py.", "",
        "## Held-out perplexity (modules never trained on: "
        f"{', '.join(r['held_out_modules'])})", "",
        "| weights | tokens | nll (nats/token) | ppl | vs bf16 | safetensors |",
        "|---|---|---|---|---|---|",
    ]
    for fmt in ("bf16", "nvfp4", "fp8"):
        f = p[fmt]
        lines.append(f"| {fmt} | {f['tokens']} | {f['nll']:.4f} | {f['ppl']:.3f} | "
                     f"{100 * (f['ppl'] / p['bf16']['ppl'] - 1):+.2f}% | "
                     f"{f['size_bytes'] / 2**20:.1f} MiB |")
    verdict = "met" if r["nvfp4_ppl_ratio"] <= 1.05 else "NOT met"
    lines += ["", f"NVFP4 within 5% of bf16: {verdict} ({r['nvfp4_ppl_ratio']:.4f}x).", "",
              "## MTP speculative decoding, batch 1, greedy", "",
              f"On {r['speculation_setup']['device']}. "
              f"{r['speculation_setup']['prompts']} held-out code prompts of "
              f"{r['speculation_setup']['prompt_len']} tokens, "
              f"{r['speculation_setup']['max_tokens']} output tokens each.", "",
              "| draft tokens | acceptance | decode tokens/s | speedup | outputs identical |",
              "|---|---|---|---|---|"]
    for k, s in sorted(r["speculation"].items(), key=lambda kv: int(kv[0])):
        acc = "-" if s["acceptance"] is None else f"{100 * s['acceptance']:.1f}% " \
            f"({s['accepted']}/{s['drafted']})"
        lines.append(f"| {k} | {acc} | {s['decode_tokens_per_s']:.1f} | {s['speedup']:.2f}x | "
                     f"{'yes' if s['outputs_identical'] else 'NO'} |")
    lines += ["", "## transformers parity (fp32)", "",
              f"NemotronHForCausalLM vs baton, max |diff| / max |logit| = "
              f"{r['parity_rel_err']:.2e} (target < 1e-4).", "",
              f"## Calculator agent loop: {r['agent_correct']}/{len(r['agent'])} right", "",
              "| question | expected call | model's call | final answer | right |",
              "|---|---|---|---|---|"]
    for a in r["agent"]:
        answer = a["answer"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {a['question']} | `{a['expected']}` | `{a['call']}` | {answer} | "
                     f"{'yes' if a['correct'] else 'no'} |")
    lines += ["", "## Greedy Python completions", ""]
    for c in r["completions"]:
        lines += ["```python", c["prompt"] + c["completion"], "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "examples" / "demo")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--questions", type=int, default=10)
    parser.add_argument("--agent-tokens", type=int, default=120,
                        help="most tokens per assistant turn in the agent loop")
    parser.add_argument("--completion-tokens", type=int, default=64)
    parser.add_argument("--calibration-files", type=int, default=8)
    parser.add_argument("--ppl-bytes", type=int, help="score only this much of one file")
    parser.add_argument("--spec-device", default="cpu",
                        help="where the speculation figures run: cpu (fp32, default) or cuda "
                        "(bf16, Triton kernels); everything else runs on the CPU")
    parser.add_argument("--smoke", action="store_true",
                        help="examples/tiny, a little of everything (seconds)")
    args = parser.parse_args(argv)
    problem = demo_eval.device_error(args.spec_device)
    if problem:
        parser.error(f"--spec-device: {problem}")
    if args.smoke:
        args.model = REPO / "examples" / "tiny"
        args.prompts, args.prompt_len, args.max_tokens = 2, 16, 6
        args.questions, args.completion_tokens, args.calibration_files = 1, 4, 1
        args.agent_tokens = 8
        args.ppl_bytes = 2000
    torch.set_num_threads(1 if os.cpu_count() <= 2 else torch.get_num_threads())
    results = run(args)
    text = report(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}-demo-model"
    (args.out / f"{stem}.md").write_text(text + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
