"""`baton perplexity --model DIR FILE...`: the model's perplexity on text files, as JSON.

    baton perplexity --model examples/demo a.py b.py
    {"tokens": 51234, "nll": 1.2345, "ppl": 3.437}

Each file is tokenized on its own (files are separate documents) and scored with sliding
windows of `--window` tokens (default: the model's context) that advance by `--stride`: every
token after a file's first is predicted once, with at least window - stride tokens of context
where the file has them. Memory stays that of one window, whatever the files' length. `nll` is
the mean negative log-likelihood per scored token in nats, `ppl` its exponential. Quantized
checkpoints run through the same loader (NVFP4 as W4A16 on the CPU), so the figure compares
formats directly.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


def window_nll(model, ids: list[int], window: int, stride: int) -> tuple[int, float]:
    """(scored tokens, summed NLL) of one token sequence, window by window."""
    import torch
    import torch.nn.functional as F

    if len(ids) < 2:
        return 0, 0.0
    scored_to, total, count, begin = 1, 0.0, 0, 0  # targets [1, scored_to) are scored
    while True:
        end = min(begin + window, len(ids))
        with torch.inference_mode():
            logits = model(torch.tensor([ids[begin:end]]))[0]  # [n, V] float32
        # logits[i] predicts ids[begin + i + 1]: the new targets are [scored_to, end).
        targets = torch.tensor(ids[scored_to:end])
        rows = logits[scored_to - begin - 1: end - begin - 1]
        total += float(F.cross_entropy(rows, targets, reduction="sum"))
        count += len(targets)
        scored_to = end
        if end == len(ids):
            return count, total
        begin += stride


def perplexity(model, tokenizer, texts: list[str], window: int, stride: int) -> dict:
    tokens, total = 0, 0.0
    for text in texts:
        n, nll = window_nll(model, tokenizer.encode(text), window, stride)
        tokens += n
        total += nll
    if tokens == 0:
        raise ValueError("the files hold no token to score (each needs at least two)")
    mean = total / tokens
    return {"tokens": tokens, "nll": round(mean, 6), "ppl": round(math.exp(mean), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="baton perplexity", description="Perplexity of a checkpoint on text files (JSON).")
    parser.add_argument("--model", required=True, type=Path, help="checkpoint folder")
    parser.add_argument("files", nargs="+", type=Path, help="text files to score")
    parser.add_argument("--window", type=int,
                        help="tokens per window (default: the model's context, at most 4096)")
    parser.add_argument("--stride", type=int, help="tokens a window advances (default: half)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kernels", choices=("auto", "torch", "triton"), default="auto")
    args = parser.parse_args(argv)
    for path in args.files:
        if not path.is_file():
            parser.error(f"{path}: no such file")
    import torch

    from baton.workers.model import load_model
    from baton.workers.text.tokenizer import load_tokenizer

    model = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device,
                       kernels=args.kernels)
    window = args.window or min(model.max_model_len, 4096)
    if not 2 <= window <= model.max_model_len:
        parser.error(f"--window: {window} must be in [2, {model.max_model_len}] (the model's "
                     "context)")
    stride = args.stride or max(1, window // 2)
    if not 1 <= stride <= window - 1:
        parser.error(f"--stride: {stride} must be in [1, {window - 1}] (below --window)")
    tokenizer = load_tokenizer(args.model)
    texts = [p.read_bytes().decode("utf-8", errors="replace") for p in args.files]
    try:
        result = perplexity(model, tokenizer, texts, window, stride)
    except ValueError as err:
        print(f"baton perplexity: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0
