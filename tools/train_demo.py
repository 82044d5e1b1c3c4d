"""Trains baton's demo model: a small Nemotron-H (Mamba2, attention, LatentMoE with a shared
expert, one MTP depth) on the Python standard library and synthetic calculator chats, on the
CPU of a laptop in about an hour (53 minutes on 2 AVX2 cores, fp32), and writes it as a Hugging Face
checkpoint.

    .venv/bin/python tools/train_demo.py --out examples/demo --threads 2 \\
        --plot benchmarks/results/2026-12-02-demo-model-loss.png
    .venv/bin/python tools/train_demo.py --config smoke --steps 3 --out /tmp/smoke   # seconds
    python3 tools/train_demo.py --config demo-gpu --device cuda --precision fp32 --minutes 5 \\
        --out /tmp/demo-gpu

The model is baton's own (baton.workers.model.NemotronHModel) run through its full-sequence
forward; nothing here re-implements a layer. Everything follows from --seed: the tokenizer,
the initial weights, the order of code windows and the chats.

Losses, per step: next-token cross-entropy on a batch of code windows (every token), on a
batch of calculator chats and on a batch of short echo chats (both on assistant tokens only:
the user's and the tool's turns are context; in an echo chat the assistant repeats the user's
numbers, dense copying that the tool chats need and give little of), plus the
MTP depth's own losses on the code: next-next token from the main model's hidden state, and,
as the engine chains drafts (the depth's output fed back as the hidden state), the token after
that from its own output. The forward runs under bf16 autocast (fp32 master weights) where
the device computes bf16 natively (CUDA; CPUs with AVX512-BF16 or AMX) and in fp32 elsewhere:
on an AVX2-only CPU a bf16 step is emulated and takes 10 times as long (--precision). The
MoE routers are balanced without an auxiliary loss: after every step each router's correction
bias moves toward under-used experts.

Outputs: the checkpoint folder (config.json, model.safetensors in bf16, tokenizer.json,
tokenizer_config.json with the Nemotron 3 chat template, generation_config.json,
training.json with the recipe and the loss history) and a loss curve PNG.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import demo_chats
import demo_corpus
import demo_eval
import demo_tokenizer

from baton.workers.model.checkpoint import save_model
from baton.workers.model.config import NemotronHConfig
from baton.workers.model.layers import Router
from baton.workers.model.model import NemotronHModel
from baton.workers.progress import Progress
from baton.workers.text.chat_template import NEMOTRON3_CHAT_TEMPLATE
from baton.workers.text.tokenizer import ByteTokenizer, Tokenizer

# Every layer kind of Nemotron 3 (Mamba2, attention, LatentMoE with a shared expert) and an MTP
# depth ("*E"), attention after every Mamba layer (copying numbers is attention's job): about
# 6.5 M parameters, 13 MB in bf16.
DEMO_CONFIG = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "hybrid_override_pattern": "M*EM*EM*E",
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "intermediate_size": 512,
    "mamba_num_heads": 8,
    "mamba_head_dim": 48,
    "ssm_state_size": 32,
    "n_groups": 2,
    "conv_kernel": 4,
    "chunk_size": 64,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 256,
    "moe_shared_expert_intermediate_size": 512,
    "moe_latent_size": 128,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.0,
    "num_nextn_predict_layers": 1,
    "mtp_hybrid_override_pattern": "*E",
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
    "layer_norm_epsilon": 1e-5,
    "mamba_ssm_cache_dtype": "float32",
    # transformers' NemotronH clamps dt from below at time_step_min (an initialisation bound
    # there, 1e-3 by default), where the Mamba2 kernels and baton clamp at time_step_limit
    # ((0, inf)): a trained model has heads with dt below 1e-3, and the two would differ. With
    # 0 here both compute the same model.
    "time_step_min": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 4,
    "pad_token_id": 0,
}

# The same layer kinds at toy sizes, for the smoke test (a few steps in seconds).
SMOKE_CONFIG = {
    **DEMO_CONFIG,
    "vocab_size": 512, "hidden_size": 32, "hybrid_override_pattern": "M*E",
    "max_position_embeddings": 2048,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
    "intermediate_size": 64, "mamba_num_heads": 4, "mamba_head_dim": 16, "ssm_state_size": 8,
    "chunk_size": 16, "n_routed_experts": 4, "moe_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32, "moe_latent_size": 16,
}


@dataclass
class Recipe:
    """The training recipe of one --config (command-line flags override single fields)."""

    model: dict
    steps: int
    code_batch: int
    code_len: int
    chat_batch: int
    echo_batch: int  # short chats in which the assistant repeats the user's numbers
    lr: float
    warmup: int
    eval_every: int
    code_bytes: int | None  # None: the whole training part of the standard library
    tokenizer_chats: int  # rendered chats the tokenizer is trained on beside the code
    eval_chats: int  # held-out chats scored at each evaluation


RECIPES = {
    "demo": Recipe(DEMO_CONFIG, steps=1200, code_batch=2, code_len=1024, chat_batch=4,
                   echo_batch=8, lr=1e-3, warmup=20, eval_every=100, code_bytes=None,
                   tokenizer_chats=3000, eval_chats=16),
    # The same model on a GPU: 8x the tokens of a CPU step, as many steps as --minutes allows
    # (steps is the ceiling). The learning rate stays the CPU recipe's (the copying needs it).
    "demo-gpu": Recipe(DEMO_CONFIG, steps=20_000, code_batch=16, code_len=1024, chat_batch=32,
                       echo_batch=64, lr=1e-3, warmup=50, eval_every=250, code_bytes=None,
                       tokenizer_chats=3000, eval_chats=16),
    "smoke": Recipe(SMOKE_CONFIG, steps=3, code_batch=2, code_len=64, chat_batch=2,
                    echo_batch=2, lr=3e-3,
                    warmup=1, eval_every=2, code_bytes=100_000, tokenizer_chats=50,
                    eval_chats=4),
}
# The peak learning rate is 1e-3 and the (tied) embeddings start at 0.02. The agent loop is
# copying (the question's numbers into the call, the tool's result into the answer), and the
# earlier recipe (lr 3e-3) never learned it. On a bare digit-copying task
# (benchmarks/demo/copy_probe.py, 200 steps) the demo architecture stays near chance at lr
# 3e-3 with either scale (0.12 with 0.02, 0.20 with 0.3) and learns it at lr 1e-3 (0.98 with
# 0.02, 0.86 with 0.3): the learning rate is the fix. At 0.3 the final norm's output lines up
# with the input token's own (tied) row at init, its logit is near 77 and the first loss 69
# nats; the previous model (0.3, 900 steps) spent its first 30 steps unlearning that. At 0.02
# the first loss is ln(vocab) and held-out code loss at step 100 is 5.37 instead of 6.03.
EMBED_STD = 0.02
MTP_WEIGHT = 0.3  # each of the two MTP losses, relative to the main losses
BALANCE_RATE = 1e-3  # correction-bias step per training step (aux-loss-free balancing)
EVAL_CODE_WINDOWS = 4
# --minutes times these steps (inside the warmup, whose learning rates do not depend on the
# step count) and then fixes the step count, so `--steps N` with the recorded N repeats the run.
TIMED_STEPS = range(5, 25)


# ---------------------------------------------------------------------- data
def code_texts(limit_bytes: int | None) -> list[str]:
    texts, total = [], 0
    for path in demo_corpus.training_files():
        text = demo_corpus.read_source(path)
        texts.append(text)
        total += len(text)
        if limit_bytes is not None and total >= limit_bytes:
            break
    return texts


def chat_tokenizer(backend) -> Tokenizer:
    """baton's tokenizer over `backend` with the committed chat template: training chats are
    rendered exactly as the router renders requests."""
    eos = [backend.token_to_id(t) for t in demo_tokenizer.EOS_TOKENS]
    return Tokenizer(backend, chat_template=NEMOTRON3_CHAT_TEMPLATE, bos_token="<s>",
                     eos_token="<|im_end|>", eos_token_ids=eos)


def render(tokenizer, chat: demo_chats.Chat) -> str:
    return tokenizer.apply_chat_template(chat.messages, add_generation_prompt=False,
                                         tools=chat.tools, enable_thinking=chat.enable_thinking)


ASSISTANT_OPEN, TURN_END = "<|im_start|>assistant\n", "<|im_end|>"


def encode_chat(tokenizer: Tokenizer, chat: demo_chats.Chat) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered chat and, per token, whether it is an assistant token (from
    after `<|im_start|>assistant\\n` through the turn's `<|im_end|>`): the loss targets."""
    text = render(tokenizer, chat)
    spans, start = [], text.find(ASSISTANT_OPEN)
    while start >= 0:
        begin = start + len(ASSISTANT_OPEN)
        end = text.index(TURN_END, begin) + len(TURN_END)
        spans.append((begin, end))
        start = text.find(ASSISTANT_OPEN, end)
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    mask = [any(b <= lo and hi <= e for b, e in spans) for lo, hi in encoding.offsets]
    return encoding.ids, mask


def fit_chat(tokenizer: Tokenizer, chat: demo_chats.Chat, max_len: int
             ) -> tuple[list[int], list[bool]]:
    """encode_chat, dropping whole questions from the end until the chat fits max_len."""
    while True:
        ids, mask = encode_chat(tokenizer, chat)
        if len(ids) <= max_len:
            return ids, mask
        exchanges = [i for i, m in enumerate(chat.messages) if m["role"] == "user"]
        if len(exchanges) < 2:
            raise ValueError(f"a chat of one question takes {len(ids)} tokens, more than the "
                             f"context of {max_len}")
        chat = demo_chats.Chat(chat.messages[: exchanges[-1]], chat.tools, chat.enable_thinking)


def pad_batch(rows: list[tuple[list[int], list[bool]]], pad_id: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, (row, row_mask) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = torch.tensor(row_mask)
    return ids, mask


class CodeWindows:
    """Random windows of the training code, as one token stream (files end with </s>)."""

    def __init__(self, backend, texts: list[str], length: int, seed: int):
        eos = backend.token_to_id("</s>")
        stream: list[int] = []
        for encoding in backend.encode_batch(texts, add_special_tokens=False):
            stream += encoding.ids + [eos]
        self.tokens = torch.tensor(stream, dtype=torch.long)
        if len(self.tokens) <= length:
            raise ValueError(f"code: {len(self.tokens)} tokens are too few for windows of "
                             f"{length}")
        self.length = length
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.tokens) - self.length, (size,),
                               generator=self.generator)
        ids = torch.stack([self.tokens[s: s + self.length] for s in starts.tolist()])
        return ids, torch.ones_like(ids, dtype=torch.bool)


def held_out_code_windows(backend, length: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` windows of the held-out modules (one stream, in HELD_OUT order)."""
    texts = [demo_corpus.read_source(p) for p in demo_corpus.held_out_files()]
    stream = list(itertools.chain.from_iterable(
        e.ids for e in backend.encode_batch(texts, add_special_tokens=False)))
    count = min(count, len(stream) // length)
    ids = torch.tensor(stream[: count * length], dtype=torch.long).view(count, length)
    return ids, torch.ones_like(ids, dtype=torch.bool)


# ---------------------------------------------------------------------- model
def initialize(model: NemotronHModel, seed: int, embed_std: float = EMBED_STD) -> None:
    """Trainable weights with the usual small-model initialisation (output projections scaled
    down with depth; Mamba's A and dt as in Mamba2; embeddings at embed_std), every floating
    tensor trainable."""
    gen = torch.Generator().manual_seed(seed)
    depth = len(model.layer_kinds)
    out_std = 0.02 / math.sqrt(2 * depth)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
            if leaf == "A_log":
                param.copy_(torch.log(1 + 15 * torch.rand(param.shape, generator=gen)))
            elif leaf == "dt_bias":
                low, high = math.log(1e-3), math.log(1e-1)
                dt = torch.exp(low + (high - low) * torch.rand(param.shape, generator=gen))
                param.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            elif name.endswith("embeddings.weight"):
                param.normal_(0.0, embed_std, generator=gen)
            elif leaf == "D" or "norm" in module or leaf == "weight" and param.dim() == 1:
                param.fill_(1.0)
            elif leaf == "bias":
                param.zero_()
            elif module == "conv1d":
                bound = 1 / math.sqrt(param.shape[-1])
                param.uniform_(-bound, bound, generator=gen)
            else:
                output = module in ("o_proj", "out_proj", "down_proj", "fc2_latent_proj") or (
                    leaf == "down_weight")
                param.normal_(0.0, out_std if output else 0.02, generator=gen)
            param.requires_grad_(True)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.zero_()
    model.tie_weights()


class ExpertBalancer:
    """Aux-loss-free load balancing: counts each router's expert choices during training
    forwards and, after each step, nudges its correction bias toward the experts it used
    less than evenly."""

    def __init__(self, model: NemotronHModel, rate: float):
        self.rate = rate
        self.active = False
        self.counts: dict[Router, torch.Tensor] = {}
        for module in model.modules():
            if isinstance(module, Router):
                # On the router's device: its choices are counted where they are made.
                self.counts[module] = torch.zeros(
                    module.config.n_routed_experts,
                    device=module.e_score_correction_bias.device)
                module.register_forward_hook(self._count)

    def _count(self, router: Router, _inputs, output) -> None:
        if self.active:
            _, topk_ids = output
            self.counts[router] += torch.bincount(topk_ids.reshape(-1),
                                                  minlength=len(self.counts[router])).float()

    def step(self) -> float:
        """Applies the bias update; returns the worst expert's load relative to even."""
        worst = 0.0
        with torch.no_grad():
            for router, counts in self.counts.items():
                if counts.sum() == 0:
                    continue
                load = counts / counts.sum()
                even = 1.0 / len(load)
                router.e_score_correction_bias += self.rate * torch.sign(even - load)
                worst = max(worst, float(load.max() / even))
                counts.zero_()
        return worst


def masked_ce(model: NemotronHModel, hidden: torch.Tensor, targets: torch.Tensor,
              mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the logits of hidden [B, T, H] against targets [B, T] over the
    masked positions (the lm_head runs on those rows only: most chat tokens are no target)."""
    if not mask.any():
        return hidden.sum() * 0.0
    return F.cross_entropy(model.compute_logits(hidden[mask]), targets[mask])


def sequence_losses(model: NemotronHModel, ids: torch.Tensor, mask: torch.Tensor,
                    mtp: bool = True) -> dict[str, torch.Tensor]:
    """Next-token loss and (mtp) the MTP depth's losses: the next-next token from the main
    hidden state, and the token after that from its own output, as the engine chains a second
    draft. mask[b, t]: whether token t is a target."""
    hidden = model.hidden_states(ids)  # [B, T, H]
    losses = {"main": masked_ce(model, hidden[:, :-1], ids[:, 1:], mask[:, 1:])}
    if mtp and model.mtp is not None and ids.shape[1] > 3:
        first = model.mtp_forward_full(hidden[:, :-2], ids[:, 1:-1])  # predicts t + 2
        losses["mtp1"] = masked_ce(model, first, ids[:, 2:], mask[:, 2:])
        # The engine's second draft attends to the first depth's entries of earlier positions;
        # over whole sequences it attends to its own: close, not the same.
        second = model.mtp_forward_full(first[:, :-1], ids[:, 2:-1])  # predicts t + 3
        losses["mtp2"] = masked_ce(model, second, ids[:, 3:], mask[:, 3:])
    return losses


@torch.no_grad()
def evaluate(model: NemotronHModel, code: tuple[torch.Tensor, torch.Tensor],
             chats: tuple[torch.Tensor, torch.Tensor], digit_ids: list[int]
             ) -> dict[str, float]:
    """Held-out code loss, held-out chat loss (assistant tokens), and, teacher forced, over the
    held-out chats' assistant turns: the share whose every token is the model's argmax
    (turn_exact) and the share of turns with numbers whose every digit is (digits_exact: the
    copying of numbers never trained on, which the agent loop needs; the wording around them
    is the model's free choice)."""
    out = {}
    ids, mask = (t.to(model.device) for t in code)
    out["code_loss"] = float(masked_ce(model, model.hidden_states(ids)[:, :-1], ids[:, 1:],
                                       mask[:, 1:]))
    ids, mask = (t.to(model.device) for t in chats)
    hidden = model.hidden_states(ids)[:, :-1]
    targets, target_mask = ids[:, 1:], mask[:, 1:]
    out["chat_loss"] = float(masked_ce(model, hidden, targets, target_mask))
    right = torch.zeros_like(target_mask)
    right[target_mask] = model.compute_logits(hidden[target_mask]).argmax(-1) == (
        targets[target_mask])
    is_digit = torch.isin(targets, torch.tensor(digit_ids, device=targets.device))
    turns = exact = numbered = digits_exact = 0
    for row_mask, row_right, row_digit in zip(target_mask.tolist(), right.tolist(),
                                              is_digit.tolist()):
        # Each run of consecutive targets is one assistant turn.
        for is_target, run in itertools.groupby(zip(row_mask, row_right, row_digit),
                                                key=lambda p: p[0]):
            if is_target:
                run = list(run)
                turns += 1
                exact += all(r for _, r, _ in run)
                digits = [r for _, r, d in run if d]
                if digits:
                    numbered += 1
                    digits_exact += all(digits)
    out["turn_exact"] = exact / max(1, turns)
    out["digits_exact"] = digits_exact / max(1, numbered)
    return out


PRECISIONS = ("auto", "bf16", "fp32")


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls natively on this CPU (AVX512-BF16 or AMX)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check is not None and torch.backends.mkldnn.is_available() and check())


def autocast_dtype(device: torch.device, precision: str,
                   cpu_bf16: bool | None = None) -> torch.dtype:
    """The forward's compute dtype for --precision: bf16 or fp32 as asked; auto takes bf16
    where the device computes it natively and fp32 elsewhere (on an AVX2-only CPU the code
    batch of a demo step, forward and backward, takes 36 s under bf16 autocast, 1.9 s in
    fp32; the whole step 3 s)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        native = cpu_has_native_bf16() if cpu_bf16 is None else cpu_bf16
        return torch.bfloat16 if native else torch.float32
    return torch.float32


def budget_steps(recipe: Recipe, history: list[dict], budget_s: float, elapsed_s: float,
                 log) -> Recipe:
    """The recipe with as many steps as fit in what is left of budget_s at the mean time of
    the TIMED_STEPS steps (at least one more than done, at most recipe.steps)."""
    timed = [h["seconds"] for h in history[TIMED_STEPS.start:TIMED_STEPS.stop]]
    per_step = sum(timed) / len(timed)
    done = len(history)
    steps = min(recipe.steps, max(done + 1, done + int((budget_s - elapsed_s) / per_step)))
    print(f"--minutes {budget_s / 60:g}: {per_step:.3f} s a step over steps "
          f"{TIMED_STEPS.start + 1}-{TIMED_STEPS.stop}, {elapsed_s:.0f} s gone: {steps} steps "
          f"(repeat the run with --steps {steps})", file=log)
    return Recipe(**{**recipe.__dict__, "steps": steps})


def lr_at(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------- outputs
def plot(history: list[dict], evals: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = [h["step"] for h in history]

    def smooth(values: list[float], span: int = 20) -> list[float]:
        out, acc = [], None
        for v in values:
            acc = v if acc is None else acc + (v - acc) * 2 / (span + 1)
            out.append(acc)
        return out

    for key, label in (("code", "code (train)"), ("chat", "chat, assistant tokens (train)"),
                       ("echo", "echo chats (train)"),
                       ("code_mtp1", "code, MTP next-next token (train)"),
                       ("code_mtp2", "code, MTP chained (train)")):
        if key in history[0]:
            left.plot(steps, smooth([h[key] for h in history]), label=label)
    if evals:
        left.plot([e["step"] for e in evals], [e["code_loss"] for e in evals], "o-",
                  label="code (held-out modules)")
        left.plot([e["step"] for e in evals], [e["chat_loss"] for e in evals], "s-",
                  label="chat (held-out numbers)")
        for key, label in (("turn_exact", "every token right"),
                           ("digits_exact", "every digit right")):
            right.plot([e["step"] for e in evals], [e[key] for e in evals], "o-", label=label)
        right.legend()
    left.set_xlabel("step")
    left.set_ylabel("cross-entropy (nats/token)")
    left.set_yscale("log")
    left.grid(alpha=0.3)
    left.legend()
    left.set_title(title)
    right.set_xlabel("step")
    right.set_ylabel("share of held-out assistant turns")
    right.set_ylim(-0.02, 1.02)
    right.set_xlim(0, max(steps) + 1)
    right.grid(alpha=0.3)
    right.set_title("held-out assistant turns, teacher forced")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_checkpoint(model: NemotronHModel, backend, out: Path, recipe: Recipe,
                     record: dict) -> None:
    save_model(model, out, recipe.model, dtype=torch.bfloat16)
    demo_tokenizer.write_tokenizer_files(out, backend)
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(RECIPES), default="demo")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument("--plot", type=Path, help="loss curve PNG (default OUT/training.png)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="override the recipe's step count (with "
                        "--minutes: the most steps)")
    for name in ("code_batch", "code_len", "chat_batch", "echo_batch", "warmup", "eval_every"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int,
                            help=f"override the recipe's {name}")
    parser.add_argument("--lr", type=float, help="override the recipe's peak learning rate")
    parser.add_argument("--embed-std", type=float, default=EMBED_STD,
                        help=f"initial std of the tied embeddings (default {EMBED_STD})")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a CPU shared with other work, "
                        "more threads than free cores make every step several times slower)")
    parser.add_argument("--minutes", type=float,
                        help="train about this long: the step count (at most the recipe's) "
                        f"is set from the time of steps {TIMED_STEPS.start + 1}-"
                        f"{TIMED_STEPS.stop} and recorded; needs a warmup over "
                        f"{TIMED_STEPS.stop} steps")
    parser.add_argument("--device", default="cpu",
                        help="torch device to train on: cpu (default), cuda, cuda:N")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="forward compute dtype (default auto: bf16 autocast where the "
                        "device has native bf16, else fp32; weights are fp32 either way)")
    args = parser.parse_args(argv)
    for name in ("steps", "code_batch", "code_len", "chat_batch", "eval_every", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
    for name in ("warmup", "echo_batch"):
        value = getattr(args, name)
        if value is not None and value < 0:
            parser.error(f"--{name.replace('_', '-')}: must be >= 0, got {value}")
    if args.lr is not None and not args.lr > 0:
        parser.error(f"--lr: must be > 0, got {args.lr}")
    if not args.embed_std > 0:
        parser.error(f"--embed-std: must be > 0, got {args.embed_std}")
    if args.minutes is not None:
        if not args.minutes > 0:
            parser.error(f"--minutes: must be > 0, got {args.minutes}")
        recipe = RECIPES[args.config]
        warmup = recipe.warmup if args.warmup is None else args.warmup
        steps = recipe.steps if args.steps is None else args.steps
        if warmup <= TIMED_STEPS.stop:
            parser.error(f"--minutes: needs a warmup of more than {TIMED_STEPS.stop} steps "
                         f"(the timed steps must not depend on the step count), got {warmup}")
        if steps <= TIMED_STEPS.stop:
            parser.error(f"--minutes: needs a ceiling of more than {TIMED_STEPS.stop} steps "
                         f"(--steps or the recipe's), got {steps}")
    problem = demo_eval.device_error(args.device)
    if problem:
        parser.error(f"--device: {problem}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    recipe = RECIPES[args.config]
    overrides = {name: getattr(args, name) for name in
                 ("steps", "code_batch", "code_len", "chat_batch", "echo_batch", "warmup",
                  "eval_every", "lr")
                 if getattr(args, name) is not None}
    recipe = Recipe(**{**recipe.__dict__, **overrides})
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    compute_dtype = autocast_dtype(device, args.precision)
    started = time.monotonic()
    log = sys.stderr

    # Tokenizer on the training mix (code + rendered chats), all from the seed.
    texts = code_texts(recipe.code_bytes)
    stream = demo_chats.chats(args.seed)
    echoes = demo_chats.echo_chats(args.seed + 3)
    # Rendering needs only the template (the BPE vocabulary does not exist yet).
    renderer = ByteTokenizer(chat_template=NEMOTRON3_CHAT_TEMPLATE)
    sample_chats = [render(renderer, next(stream)) for _ in range(recipe.tokenizer_chats)]
    backend = demo_tokenizer.train_tokenizer(itertools.chain(texts, sample_chats),
                                             recipe.model["vocab_size"])
    tokenizer = chat_tokenizer(backend)
    pad_id = backend.token_to_id("<pad>")
    digit_ids = [backend.token_to_id(str(d)) for d in range(10)]
    code = CodeWindows(backend, texts, recipe.code_len, seed=args.seed + 1)
    eval_code = held_out_code_windows(backend, recipe.code_len, EVAL_CODE_WINDOWS)
    context = recipe.model["max_position_embeddings"]
    eval_chats = pad_batch([fit_chat(tokenizer, c, context) for c in itertools.islice(
        demo_chats.chats(args.seed + 7, held_out=True), recipe.eval_chats)], pad_id)
    print(f"data: {len(texts)} code files, {len(code.tokens)} code tokens, vocab "
          f"{backend.get_vocab_size()} ({time.monotonic() - started:.0f} s)", file=log)

    torch.manual_seed(args.seed)
    config = NemotronHConfig.from_dict({"model_type": "nemotron_h", **recipe.model})
    model = NemotronHModel(config, dtype=torch.float32).to(device)
    initialize(model, args.seed, args.embed_std)
    model.train()
    balancer = ExpertBalancer(model, BALANCE_RATE)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=recipe.lr, betas=(0.9, 0.95), eps=1e-8)
    n_params = sum(p.numel() for p in params)
    print(f"model: {n_params / 1e6:.2f} M parameters, layers {config.layer_kinds}, MTP "
          f"{config.mtp_layer_kinds}, compute {str(compute_dtype).removeprefix('torch.')} "
          f"on {device}", file=log)

    history: list[dict] = []
    evals: list[dict] = []
    record = {
        "config": args.config, "seed": args.seed, "steps": recipe.steps,
        "recipe": {k: v for k, v in recipe.__dict__.items() if k != "model"},
        "embed_std": args.embed_std, "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "device": str(device), "threads": args.threads, "parameters": n_params,
        "code_files": len(texts), "code_tokens": len(code.tokens),
        "held_out_modules": list(demo_corpus.HELD_OUT),
        "python": platform.python_version(), "torch": torch.__version__,
        "history": history, "evals": evals,
    }
    plot_path = args.plot or args.out / "training.png"
    tokens_seen = 0
    progress = Progress(recipe.steps, "training", unit="step")
    step = 0
    while step < recipe.steps:  # --minutes may change recipe.steps at step TIMED_STEPS.stop
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe)
        t0 = time.monotonic()
        code_ids, code_mask = code.batch(recipe.code_batch)
        chat_ids, chat_mask = pad_batch(
            [fit_chat(tokenizer, next(stream), context) for _ in range(recipe.chat_batch)],
            pad_id)
        batches = [("code", code_ids, code_mask), ("chat", chat_ids, chat_mask)]
        if recipe.echo_batch:
            batches.append(("echo", *pad_batch(
                [encode_chat(tokenizer, next(echoes)) for _ in range(recipe.echo_batch)],
                pad_id)))
        balancer.active = True
        entry = {"step": step + 1}
        total = 0.0
        for kind, ids, mask in batches:
            # MTP losses on code only: drafting pays off on long outputs, and the chats' long
            # system turn would double their cost for a handful of assistant tokens.
            with torch.autocast(device.type, dtype=compute_dtype,
                                enabled=compute_dtype != torch.float32):
                losses = sequence_losses(model, ids.to(device), mask.to(device),
                                         mtp=kind == "code")
            loss = losses["main"] + MTP_WEIGHT * (losses.get("mtp1", 0) + losses.get("mtp2", 0))
            loss.backward()
            entry[kind] = float(losses["main"].detach())
            for key in ("mtp1", "mtp2"):
                if key in losses:
                    entry[f"{kind}_{key}"] = float(losses[key].detach())
            total += float(loss.detach())
            tokens_seen += ids.numel()
        balancer.active = False
        entry["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        entry["expert_load_max"] = balancer.step()
        entry["seconds"] = round(time.monotonic() - t0, 3)
        history.append(entry)
        if not math.isfinite(total):
            raise RuntimeError(f"step {step + 1}: the loss is {total} ({entry})")
        if args.minutes is not None and step + 1 == TIMED_STEPS.stop:
            recipe = budget_steps(recipe, history, args.minutes * 60,
                                  time.monotonic() - started, log)
            progress.total = recipe.steps
            record["steps"] = recipe.steps
            record["recipe"]["steps"] = recipe.steps
            record["minutes"] = args.minutes
        progress.update(1, code=entry["code"], chat=entry["chat"],
                        mtp=entry.get("code_mtp1", 0.0),
                        tok_s=f"{sum(b[1].numel() for b in batches) / entry['seconds']:.0f}")
        if (step + 1) % recipe.eval_every == 0 or step + 1 == recipe.steps:
            model.eval()
            result = {"step": step + 1, **evaluate(model, eval_code, eval_chats, digit_ids)}
            model.train()
            evals.append(result)
            print(f"eval at step {step + 1}: " + ", ".join(
                f"{k}={v:.4f}" for k, v in result.items() if k != "step"), file=log)
            record["tokens_seen"] = tokens_seen
            record["train_seconds"] = round(time.monotonic() - started, 1)
            write_checkpoint(model, backend, args.out, recipe, record)
            plot(history, evals, plot_path, f"demo model ({args.config}, seed {args.seed})")
        step += 1
    progress.close()
    print(f"wrote {args.out} and {plot_path} after {time.monotonic() - started:.0f} s",
          file=log)
    return record


if __name__ == "__main__":
    main()
