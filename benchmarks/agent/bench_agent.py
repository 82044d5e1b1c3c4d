"""Agent sessions through `baton up` (one prefill, two decode workers): the prefix cache on and
off, prefix-aware and least-loaded routing, per turn index.

    python benchmarks/agent/bench_agent.py [--sessions 4] [--turns 10] [--seed 7]
        [--configs on:prefix-aware,on:least-loaded,off:prefix-aware,off:least-loaded]
        [--out DIR]
    python benchmarks/agent/bench_agent.py --smoke --out DIR     # the tiny model, seconds

The trace (session_trace.py, seeded): every session shares one system prompt with tool
definitions; each turn appends a user message or a tool result (200-4000 tokens) to the
session's history and sends it whole, as agent loops do; the answer (greedy, eos ignored) is
appended before the next turn. Turn by turn, every session sends its turn at once (streamed
/v1/completions with token-id prompts), and the next turn starts when all have answered, so
the workers' counters between two turns belong to that turn index.

Reported per turn index: TTFT p50 / p90 (send to first streamed token), the tokens new in the
turn (the appended messages; turn 1 also counts the system prompt of every session), the
prompt tokens the workers computed (every worker's baton_prompt_tokens_total: prefill and
local prefill), their ratio, the cached tokens the clients were told (usage
prompt_tokens_details), the state bytes transferred (the prefill worker's
baton_state_transfer_bytes_total) and the share of requests a decode worker prefilled itself.
Targets (cache on, prefix-aware): computed <= 1.3 x new in every turn; TTFT p50 at the last
turn within 1.5 x the first.

Model: a random Nemotron-H checkpoint somewhat larger than examples/tiny (hidden 128, three
Mamba, two attention and MoE layers, one MTP layer) with a context of 32768 tokens, written
once into --checkpoint; fp32 on the CPU, bf16 on a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from session_trace import Trace, generate  # noqa: E402

from baton.workers.local import LocalDeployment, free_port  # noqa: E402

RESULTS = HERE.parent / "results"
SERVED_NAME = "agent"
CONFIGS = ("on:prefix-aware", "on:least-loaded", "off:prefix-aware", "off:least-loaded")
TARGET_COMPUTED = 1.3
TARGET_TTFT = 1.5
MODEL = {
    "vocab_size": 512, "hidden_size": 128, "hybrid_override_pattern": "M*EM-EM*E",
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "intermediate_size": 256, "mamba_num_heads": 8, "mamba_head_dim": 16,
    "ssm_state_size": 16, "n_groups": 2, "conv_kernel": 4, "chunk_size": 64,
    "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 64, "moe_latent_size": 64, "n_group": 1,
    "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
    "num_nextn_predict_layers": 1, "mtp_hybrid_override_pattern": "*E",
    "max_position_embeddings": 32768, "tie_word_embeddings": True, "eos_token_id": 2,
    "bos_token_id": 1, "pad_token_id": 0,
}


@dataclass
class TurnStats:
    ttft: list[float] = field(default_factory=list)
    new_tokens: int = 0
    computed: float = 0.0
    cached: int = 0
    transferred: float = 0.0
    local: float = 0.0
    requests: int = 0

    def ttft_at(self, q: float) -> float:
        ordered = sorted(self.ttft)
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def model_yaml(checkpoint: Path, cache: bool, routing: str, max_model_len: int) -> str:
    pool = "      - {name: local, minReplicas: %d, maxReplicas: %d}\n"
    return (
        "apiVersion: baton.dev/v1alpha1\nkind: Model\n"
        f"metadata: {{name: {SERVED_NAME}, namespace: default}}\n"
        "spec:\n"
        f"  source: {{uri: 'file://{checkpoint.resolve()}'}}\n"
        f"  engine: {{maxModelLen: {max_model_len}, kvPageSize: 16, dtype: auto,\n"
        f"           prefixCache: {{enabled: {str(cache).lower()}}}}}\n"
        f"  router: {{routing: {routing}, requestTimeoutSeconds: 900, "
        "transferTimeoutSeconds: 300}\n"
        "  prefill:\n    maxBatchTokens: 2048\n"
        f"    pools:\n{pool % (1, 1)}"
        "  decode:\n    maxConcurrency: 8\n    speculativeTokens: 1\n"
        f"    pools:\n{pool % (2, 2)}"
    )


def ensure_checkpoint(folder: Path, config: dict) -> Path:
    import torch

    from baton.workers.model.checkpoint import write_random_checkpoint

    held = folder / "config.json"
    if held.exists() and (folder / "tokenizer.json").exists():
        if all(json.loads(held.read_text()).get(k) == v for k, v in config.items()):
            return folder
    write_random_checkpoint(folder, config, seed=1, dtype=torch.float32, tokenizer=True)
    return folder


def scrape(up: LocalDeployment, name: str, workers: str) -> float:
    """A series summed over the workers whose name starts with `workers`."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for child in up.children:
        if child.name == "router" or not child.name.startswith(workers):
            continue
        with urllib.request.urlopen(f"http://127.0.0.1:{child.metrics_port}/metrics",
                                    timeout=10) as reply:
            text = reply.read().decode()
        total += sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                     if s.name == name)
    return total


async def one_turn(http, url: str, prompt: list[int], answer_tokens: int):
    """(TTFT, answer token ids, cached tokens) of one streamed completion."""
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": answer_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "logprobs": 0,
            "return_tokens_as_token_ids": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, ids, cached = None, [], 0
    async with http.stream("POST", url + "/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {(await reply.aread())[:300]!r}")
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if event.get("usage"):
                cached = event["usage"]["prompt_tokens_details"]["cached_tokens"]
            for choice in event.get("choices", []):
                tokens = (choice.get("logprobs") or {}).get("tokens") or []
                if tokens and first is None:
                    first = time.perf_counter() - start
                ids += [int(t.removeprefix("token_id:")) for t in tokens]
    if first is None or len(ids) != answer_tokens:
        raise RuntimeError(f"a turn streamed {len(ids)} of {answer_tokens} tokens")
    return first, ids, cached


async def replay(up: LocalDeployment, trace: Trace) -> list[TurnStats]:
    import httpx

    histories = [list(trace.system) for _ in trace.sessions]
    stats = []
    async with httpx.AsyncClient(timeout=900) as http:
        for t in range(len(trace.sessions[0].turns)):
            for h, s in zip(histories, trace.sessions):
                h.extend(s.turns[t].tokens)
            before = [scrape(up, "baton_prompt_tokens_total", ""),
                      scrape(up, "baton_state_transfer_bytes_total", "prefill"),
                      scrape(up, "baton_local_prefills_total", "decode")]
            results = await asyncio.gather(*(one_turn(http, up.base_url, list(h),
                                                      trace.answer_tokens)
                                             for h in histories))
            after = [scrape(up, "baton_prompt_tokens_total", ""),
                     scrape(up, "baton_state_transfer_bytes_total", "prefill"),
                     scrape(up, "baton_local_prefills_total", "decode")]
            turn = TurnStats(new_tokens=trace.new_tokens(t), requests=len(histories))
            turn.computed, turn.transferred, turn.local = (a - b for a, b in zip(after, before))
            for h, (ttft, ids, cached) in zip(histories, results):
                turn.ttft.append(ttft)
                turn.cached += cached
                h.extend(ids)
            stats.append(turn)
            print(f"  turn {t + 1}: TTFT p50 {turn.ttft_at(0.5):.3f} s, computed "
                  f"{turn.computed:.0f} of {turn.new_tokens} new, {turn.transferred:.0f} B "
                  "moved", flush=True)
    return stats


HEADER = ["turn", "TTFT p50 (s)", "TTFT p90 (s)", "new tokens", "computed", "computed / new",
          "cached (clients)", "state bytes moved", "local prefills"]


def table(stats: list[TurnStats]) -> list[str]:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for t, s in enumerate(stats):
        lines.append("| " + " | ".join([
            str(t + 1), f"{s.ttft_at(0.5):.3f}", f"{s.ttft_at(0.9):.3f}", str(s.new_tokens),
            f"{s.computed:.0f}", f"{s.computed / max(s.new_tokens, 1):.2f}", str(s.cached),
            f"{s.transferred:,.0f}", f"{s.local / max(s.requests, 1):.0%}"]) + " |")
    return lines


def totals(stats: list[TurnStats]) -> str:
    """Turns 2..M together: what the cache is for (turn 1 is cold in every configuration)."""
    later = stats[1:]
    computed, new = sum(s.computed for s in later), sum(s.new_tokens for s in later)
    moved = sum(s.transferred for s in later)
    local = sum(s.local for s in later) / max(sum(s.requests for s in later), 1)
    return (f"Turns 2-{len(stats)}: {computed:,.0f} prompt tokens computed for {new:,} new "
            f"({computed / max(new, 1):.2f} x), {moved:,.0f} state bytes moved, "
            f"{local:.0%} local prefills.")


def targets(stats: list[TurnStats]) -> list[str]:
    ratios = [s.computed / max(s.new_tokens, 1) for s in stats]
    worst = max(range(len(ratios)), key=ratios.__getitem__)
    ttft = stats[-1].ttft_at(0.5) / stats[0].ttft_at(0.5)
    return [
        f"- prefill tokens computed <= {TARGET_COMPUTED} x new in every turn: "
        f"{'met' if ratios[worst] <= TARGET_COMPUTED else 'NOT met'} (worst: turn "
        f"{worst + 1}, {ratios[worst]:.2f} x)",
        f"- TTFT p50 at turn {len(stats)} within {TARGET_TTFT} x turn 1: "
        f"{'met' if ttft <= TARGET_TTFT else 'NOT met'} ({ttft:.2f} x)",
    ]


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {_cores()} cores)"


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def parse_configs(text: str) -> list[tuple[bool, str]]:
    out = []
    for item in (c.strip() for c in text.split(",") if c.strip()):
        if item not in CONFIGS:
            raise ValueError(f"--configs: {item!r} is not one of {', '.join(CONFIGS)}")
        cache, routing = item.split(":")
        out.append((cache == "on", routing))
    if not out:
        raise ValueError(f"--configs: {text!r} names no configuration")
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--checkpoint", type=Path, default=Path(tempfile.gettempdir())
                   / "baton-bench-agent-model")
    p.add_argument("--max-model-len", type=int, default=16384)
    p.add_argument("--cache-memory", default="512Mi", help="per worker (baton up)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--smoke", action="store_true",
                   help="examples/tiny, 2 sessions x 3 short turns, two configurations")
    args = p.parse_args(argv)
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> int:
    import torch
    import triton

    from baton.workers.server.settings import parse_size

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.smoke:
        trace = generate(2, 3, args.seed, system_tokens=120, user=(20, 60), tool=(20, 120),
                         answer_tokens=4)
        checkpoint = HERE.parents[1] / "examples" / "tiny"
        configs = [(True, "prefix-aware"), (False, "least-loaded")]
        max_model_len = 1024
    else:
        trace = generate(args.sessions, args.turns, args.seed,
                         max_history=args.max_model_len - 64)
        checkpoint = ensure_checkpoint(args.checkpoint, MODEL)
        configs = parse_configs(args.configs)
        max_model_len = args.max_model_len
    if trace.longest_history() >= max_model_len:
        raise ValueError(f"the trace's longest history ({trace.longest_history()} tokens) "
                         f"does not fit --max-model-len={max_model_len}")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for cache, routing in configs:
        name = f"cache {'on' if cache else 'off'}, {routing}"
        print(f"{name}:", flush=True)
        run_dir = Path(tempfile.mkdtemp(prefix="baton-bench-agent-"))
        spec = run_dir / "model.yaml"
        spec.write_text(model_yaml(checkpoint, cache, routing, max_model_len))
        up = LocalDeployment(spec, port=free_port(), run_dir=run_dir,
                             cache_memory_bytes=parse_size(args.cache_memory))
        try:
            up.start()
            up.wait_ready()
            runs[name] = asyncio.run(replay(up, trace))
        finally:
            up.stop()
    date = datetime.date.today().isoformat()
    device = device_name()
    tag = "cpu" if device.startswith("CPU") else "gpu"
    lines = [
        f"# Agent sessions through baton up on {device}",
        "",
        f"Date: {date}. torch {torch.__version__}, triton {triton.__version__}, Python "
        f"{sys.version.split()[0]}.",
        f"Command: `python benchmarks/agent/bench_agent.py {' '.join(args.argv)}`.",
        "",
        f"Trace: seed {trace.seed}, {len(trace.sessions)} sessions x "
        f"{len(trace.sessions[0].turns)} turns, a {len(trace.system)}-token shared system "
        f"prompt, {trace.answer_tokens}-token answers (greedy, eos ignored); longest history "
        f"{trace.longest_history()} tokens. Every session sends turn t at once; turn t + 1 "
        "starts when all answered.",
        f"Deployment: baton up, 1 prefill + 2 decode workers (maxConcurrency 8, MTP "
        f"speculation 1 token), maxModelLen {max_model_len}, localPrefillMaxTokens 512 "
        f"(default), snapshotIntervalTokens 1024 (default), --cache-memory "
        f"{args.cache_memory} per worker; model "
        f"{'examples/tiny' if args.smoke else 'random, hidden 128, pattern M*EM-EM*E + MTP'}.",
        "",
    ]
    for name, stats in runs.items():
        lines += [f"## {name}", "", *table(stats), "", totals(stats), ""]
        if name.startswith("cache on"):
            lines += ["Targets:", *targets(stats), ""]
    lines += ["Columns: see the script's docstring. 'computed' counts every prompt token a "
              "worker ran through the model in that turn (the prefill worker and local "
              "prefills on the decode workers)."]
    report = args.out / f"{date}-{tag}-agent.md"
    report.write_text("\n".join(lines) + "\n")
    figures = {name: [{"ttft": s.ttft, "new_tokens": s.new_tokens, "computed": s.computed,
                       "cached": s.cached, "transferred": s.transferred, "local": s.local,
                       "requests": s.requests} for s in stats] for name, stats in runs.items()}
    report.with_suffix(".json").write_text(json.dumps(figures, indent=1) + "\n")
    print("\n".join(lines))
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
