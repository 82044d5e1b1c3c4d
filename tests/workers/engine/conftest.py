"""Tiny random fp32 Nemotron-H models for the engine tests, and a full-recompute reference."""

from __future__ import annotations

import pytest
import torch

from baton.workers.model import NemotronHModel, load_model
from baton.workers.model.checkpoint import write_random_checkpoint

# Several Mamba and attention layers, MoE (LatentMoE + shared expert), a dense MLP, and one MTP
# depth of attention + MoE.
TINY = dict(
    vocab_size=97,
    hidden_size=32,
    hybrid_override_pattern="M*EM*-M",
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=48,
    mamba_num_heads=4,
    mamba_head_dim=8,
    ssm_state_size=8,
    n_groups=2,
    conv_kernel=4,
    chunk_size=8,
    n_routed_experts=6,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    moe_shared_expert_intermediate_size=24,
    moe_latent_size=16,
    routed_scaling_factor=1.5,
    max_position_embeddings=160,
    num_nextn_predict_layers=1,
    mtp_hybrid_override_pattern="*E",
    eos_token_id=2,
)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> NemotronHModel:
    """TINY written by write_random_checkpoint and read back by load_model (fp32, torch path)."""
    path = write_random_checkpoint(
        tmp_path_factory.mktemp("tiny"), TINY, seed=0, dtype=torch.float32, tokenizer=False
    )
    return load_model(path, dtype=torch.float32, kernels="torch")


class Recorder:
    """Collects (request, position) -> logits from Engine.runner.logits_observer."""

    def __init__(self) -> None:
        self.logits: dict[tuple[str, int], torch.Tensor] = {}

    def __call__(self, request_ids, positions, logits) -> None:
        for rid, pos, row in zip(request_ids, positions, logits):
            assert (rid, pos) not in self.logits, f"{rid} sampled position {pos} twice"
            self.logits[(rid, pos)] = row.detach().clone()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def check_against_recompute(
    model,
    recorder: Recorder,
    request_id: str,
    tokens: list[int],
    num_prompt: int,
    greedy: bool = True,
) -> int:
    """Teacher-forced check of one finished request against a full forward of its tokens.

    Every generated token's logits must be within 1e-4 relative error of the reference, and
    the token must be the reference's argmax wherever its top-1/top-2 margin exceeds 1e-3.
    Returns how many tokens had a clear margin.
    """
    ref = model(torch.tensor([tokens]))[0]
    clear = 0
    for pos in range(num_prompt, len(tokens)):
        got = recorder.logits[(request_id, pos)]
        expect = ref[pos - 1]
        err = rel_err(got, expect)
        assert err <= 1e-4, f"{request_id} position {pos}: logits rel err {err:.2e}"
        top2 = torch.topk(expect, 2).values
        if greedy and float(top2[0] - top2[1]) > 1e-3:
            clear += 1
            assert tokens[pos] == int(expect.argmax()), f"{request_id} position {pos}"
    return clear


class DraftRecorder:
    """Records every MTP draft's logits with the context it was drafted from."""

    def __init__(self, engine) -> None:
        self.context: dict[str, int] = {}
        self.drafts: list[tuple[str, int, int, torch.Tensor]] = []  # request, tokens, depth
        draft = engine.runner.draft

        def recording_draft(seqs):
            self.context.update({s.request_id: len(s.tokens) for s in seqs})
            return draft(seqs)

        engine.runner.draft = recording_draft
        engine.runner.draft_observer = self._observe

    def _observe(self, ids, positions, logits) -> None:
        for rid, pos, row in zip(ids, positions, logits):
            n = self.context[rid]
            self.drafts.append((rid, n, pos - n, row.clone()))

    def check(self, model, tokens_of: dict[str, list[int]]) -> int:
        """Each draft's logits against the MTP depth over whole sequences (no cache): true
        entries take the main model's hidden states, chained ones the previous MTP output."""
        for rid, n, depth, row in self.drafts:
            ctx = tokens_of[rid][:n]
            prev = model.hidden_states(torch.tensor([ctx[:-1]]))[0]
            nxt = ctx[1:]
            for _ in range(depth + 1):
                g = model.mtp_forward_full(prev[None], torch.tensor([nxt]))[0, -1]
                expect = model.compute_logits(g)
                # The next chained entry: this MTP output with the token it drafted.
                prev, nxt = torch.cat([prev, g[None]]), [*nxt, int(expect.argmax())]
            err = rel_err(row, expect)
            assert err <= 1e-4, f"{rid}: draft depth {depth} after {n} tokens, rel err {err:.2e}"
        return len(self.drafts)


@pytest.fixture(scope="session")
def helpers():
    """The helpers above, for test modules (conftest is not importable under importlib)."""
    import types

    return types.SimpleNamespace(
        TINY=TINY,
        Recorder=Recorder,
        DraftRecorder=DraftRecorder,
        check=check_against_recompute,
        rel_err=rel_err,
    )


@pytest.fixture(autouse=True)
def single_thread_torch():
    """Tiny shapes: one intra-op thread is faster than several fighting over 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
