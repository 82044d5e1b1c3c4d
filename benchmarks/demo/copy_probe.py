"""Can the demo model learn to copy? The agent loop is copying (the question's numbers into
the calculator call, the tool's result into the answer), so the training recipe must let the
architecture learn it quickly. This probe trains a fresh model of the demo's layers
(tools/train_demo.py DEMO_CONFIG and initialize) on a bare copying task and reports the
accuracy on the copied digits, for several initial scales of the tied embeddings.

    .venv/bin/python benchmarks/demo/copy_probe.py                 # ~4 min on 2 CPU cores
    .venv/bin/python benchmarks/demo/copy_probe.py --steps 20 --stds 0.02 --pattern "M*E"

Task: each sequence is 2-19 filler tokens, 3-7 random digits (ten token ids), a separator,
then the same digits; the loss and the accuracy count the copied digits only (chance: 0.1).
Batches of 32, AdamW at --lr, fp32. Held-out accuracy on 256 fresh sequences every 50 steps.
Output: a table on stdout and DIR/<date>-demo-copy-probe.md and .json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import train_demo  # noqa: E402

from baton.workers.model.config import NemotronHConfig  # noqa: E402
from baton.workers.model.model import NemotronHModel  # noqa: E402

DIGITS, SEPARATOR, FILLER = range(10, 20), 30, range(100, 200)


def copy_batch(size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    rows = []
    for _ in range(size):
        n = int(torch.randint(3, 8, (1,), generator=generator))
        digits = torch.randint(DIGITS.start, DIGITS.stop, (n,), generator=generator).tolist()
        before = torch.randint(FILLER.start, FILLER.stop,
                               (int(torch.randint(2, 20, (1,), generator=generator)),),
                               generator=generator).tolist()
        after = torch.randint(FILLER.start, FILLER.stop,
                              (int(torch.randint(2, 10, (1,), generator=generator)),),
                              generator=generator).tolist()
        row = before + digits + after + [SEPARATOR] + digits
        rows.append((row, [False] * (len(row) - n) + [True] * n))
    return train_demo.pad_batch(rows, pad_id=0)


def probe(config: dict, embed_std: float, steps: int, lr: float, seed: int) -> list[dict]:
    """Accuracy on copied digits every 50 steps of training from train_demo.initialize with
    the embeddings at embed_std."""
    torch.manual_seed(seed)
    model = NemotronHModel(NemotronHConfig.from_dict({"model_type": "nemotron_h", **config}),
                           dtype=torch.float32)
    train_demo.initialize(model, seed, embed_std)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95))
    train_gen = torch.Generator().manual_seed(seed)
    curve, started = [], time.monotonic()
    for step in range(1, steps + 1):
        ids, mask = copy_batch(32, train_gen)
        hidden = model.hidden_states(ids)
        loss = train_demo.masked_ce(model, hidden[:, :-1], ids[:, 1:], mask[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps:
            with torch.no_grad():
                ids, mask = copy_batch(256, torch.Generator().manual_seed(seed + 1))
                hidden = model.hidden_states(ids)[:, :-1]
                targets, mask = ids[:, 1:], mask[:, 1:]
                right = model.compute_logits(hidden[mask]).argmax(-1) == targets[mask]
            curve.append({"step": step, "loss": round(float(loss.detach()), 4),
                          "accuracy": round(float(right.float().mean()), 4),
                          "seconds": round(time.monotonic() - started, 1)})
    return curve


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--stds", type=float, nargs="+", default=[0.02, 0.3])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--pattern", help="hybrid_override_pattern (default: the demo's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps: must be >= 1, got {args.steps}")
    if any(not s > 0 for s in args.stds):
        parser.error(f"--stds: every value must be > 0, got {args.stds}")
    torch.set_num_threads(args.threads)
    config = {**train_demo.DEMO_CONFIG, "num_nextn_predict_layers": 0}
    config.pop("mtp_hybrid_override_pattern")
    if args.pattern:
        config["hybrid_override_pattern"] = args.pattern
    runs = {std: probe(config, std, args.steps, args.lr, args.seed) for std in args.stds}
    steps = [point["step"] for point in runs[args.stds[0]]]
    header = "| embedding std | " + " | ".join(f"step {s}" for s in steps) + " |"
    lines = [header, "|" + "---|" * (len(steps) + 1)]
    for std, curve in runs.items():
        lines.append(f"| {std} | " + " | ".join(f"{p['accuracy']:.3f}" for p in curve) + " |")
    table = "\n".join(lines)
    print(table)
    date = datetime.date.today().isoformat()
    result = {"date": date, "device": f"CPU ({platform.machine()}, {args.threads} threads)",
              "torch": torch.__version__, "python": platform.python_version(),
              "pattern": config["hybrid_override_pattern"], "hidden_size": config["hidden_size"],
              "steps": args.steps, "lr": args.lr, "seed": args.seed,
              "runs": {str(std): curve for std, curve in runs.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{date}-demo-copy-probe.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{date}-demo-copy-probe.md").write_text(
        f"# Demo model copy probe ({date})\n\n{result['device']}, torch {result['torch']}, "
        f"pattern {result['pattern']}, hidden {result['hidden_size']}, lr {args.lr}, batch 32, "
        f"seed {args.seed}. Accuracy on the copied digits of 256 held-out sequences (chance "
        f"0.1), by the initial std of the tied embeddings (tools/train_demo.py EMBED_STD; "
        f"every other weight as train_demo.initialize).\n\n{table}\n\n"
        f"Command: `.venv/bin/python benchmarks/demo/copy_probe.py`\n")
    return result


if __name__ == "__main__":
    main()
