"""The engine on the kernels' path (kernels="triton": Mamba2 and paged-attention kernels,
fused MoE, decode and verify steps from their batch-size buckets) equals the torch reference
path, token for token and logits within 1e-4 (fp32, the Triton interpreter on the CPU):
prompt chunks beside decode tokens, MTP drafts and their verification."""

from __future__ import annotations

import torch

from baton.workers.engine import Engine, EngineConfig, Request, SamplingParams
from baton.workers.model import load_model
from baton.workers.model.checkpoint import write_random_checkpoint


def generate(model, helpers):
    engine = Engine(model, EngineConfig(page_size=4, num_pages=32, max_num_seqs=2,
                                        max_batch_tokens=8, max_model_len=64,
                                        speculative_tokens=2, base_seed=0))
    recorder = helpers.Recorder()
    engine.runner.logits_observer = recorder
    gen = torch.Generator().manual_seed(3)
    # 11 tokens take two steps of at most 8 (a chunk continuing its state beside a decode).
    for rid, n in (("a", 3), ("b", 11)):
        engine.add_request(Request(rid, torch.randint(3, 64, (n,), generator=gen).tolist(),
                                   SamplingParams(max_tokens=5, temperature=0,
                                                  ignore_eos=True)))
    tokens: dict[str, list[int]] = {}
    while engine.has_work():
        for ev in engine.step():
            if ev.token_id is not None:
                tokens.setdefault(ev.request_id, []).append(ev.token_id)
    return tokens, recorder.logits, engine


def test_kernels_path_equals_the_torch_path_through_the_engine(tmp_path, helpers,
                                                              small_hybrid_config):
    path = write_random_checkpoint(tmp_path, small_hybrid_config, seed=2, dtype=torch.float32,
                                   tokenizer=False)
    want, want_logits, _ = generate(load_model(path, dtype=torch.float32, kernels="torch"),
                                    helpers)
    fast = load_model(path, dtype=torch.float32, kernels="triton")
    assert fast.kernels == "triton"
    got, got_logits, engine = generate(fast, helpers)
    assert got == want
    assert got_logits.keys() == want_logits.keys()
    for key, row in want_logits.items():
        assert helpers.rel_err(got_logits[key], row) <= 1e-4, key
    # Verification steps came from their buckets.
    assert engine.runner.step_graphs.replays > 0
    assert engine.stats().spec_draft_tokens_total > 0
