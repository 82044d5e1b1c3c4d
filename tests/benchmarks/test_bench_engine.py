"""The engine benchmark runs end to end on a tiny model on the CPU (engine, transformers,
roofline, report), so the GPU run does not find a broken script; its byte formulas are
checked against independent counts."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "engine" / "bench_engine.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_engine_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_engine_smoke_writes_the_table(bench, tmp_path):
    # fp32: both sides then agree to rounding, so the check below can demand every token.
    assert bench.main(["--smoke", "--batches", "1,3", "--dtype", "float32",
                       "--out", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("*-cpu-engine.md")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-cpu-engine\.md", report.name)
    text = report.read_text()
    assert "torch " in text and "triton " in text and "transformers " in text
    rows = [line for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "3"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == len(bench.HEADER)
        assert all(c not in ("", "-", "inf", "nan") for c in cells), row
        assert float(cells[1].replace(",", "")) > 0  # engine prefill tokens/s
        assert float(cells[9].replace(",", "")) > 0  # bytes of a step
        assert cells[12] == f"{cells[0]}/{cells[0]}"  # the same greedy first tokens
    parity = float(re.search(r"relative error ([0-9.e+-]+)", text).group(1))
    assert parity < 1e-4
    assert "FAILED" not in text
    figures = json.loads(report.with_suffix(".json").read_text())
    assert [r["batch"] for r in figures["rows"]] == [1, 3]
    for r in figures["rows"]:
        assert r["engine"]["decode_step_seconds"] > 0 and r["transformers"]["prefill_seconds"] > 0
        assert r["roofline_step_seconds"] == pytest.approx(
            r["step_bytes"] / figures["hbm_bytes_per_second"])


def test_bench_engine_refuses_bad_batches(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--smoke", "--batches", "1,0"])
    with pytest.raises(ValueError, match="--batches"):
        bench.parse_batches("1,x")


def test_expected_distinct_experts_matches_sampling(bench):
    from shapes import expected_distinct_experts

    assert expected_distinct_experts(128, 6, 1) == pytest.approx(6)
    assert expected_distinct_experts(128, 6, 0) == 0
    assert expected_distinct_experts(128, 6, 4096) == pytest.approx(128)
    gen = torch.Generator().manual_seed(0)
    trials, tokens = 400, 16
    scores = torch.rand(trials, tokens, 128, generator=gen)
    chosen = scores.topk(6, dim=-1).indices  # uniformly random 6 of 128 per token
    hit = torch.zeros(trials, 128).scatter_(1, chosen.reshape(trials, -1), 1.0)
    assert hit.sum(1).mean().item() == pytest.approx(
        expected_distinct_experts(128, 6, tokens), rel=0.01)
    with pytest.raises(ValueError, match="top_k"):
        expected_distinct_experts(8, 9, 1)


def test_step_bytes_account_for_every_checkpoint_byte(bench, tmp_path):
    from safetensors import safe_open
    from shapes import SMOKE

    from baton.workers.engine import Engine, EngineConfig
    from baton.workers.model import load_model
    from baton.workers.model.checkpoint import write_random_checkpoint

    path = write_random_checkpoint(tmp_path / "ckpt", SMOKE, dtype=torch.bfloat16,
                                   tokenizer=False)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        on_disk = sum(t.numel() * t.element_size() for t in map(f.get_tensor, f.keys()))
    model = load_model(path, dtype=torch.bfloat16, kernels="torch")
    engine = Engine(model, EngineConfig(num_pages=8, max_num_seqs=2, max_model_len=64))
    sizes = bench.model_sizes(model, engine)
    experts = sum(per * e for per, e, _ in sizes.expert_bytes)
    assert len(sizes.expert_bytes) == SMOKE["hybrid_override_pattern"].count("E")
    assert sizes.dense_bytes + SMOKE["vocab_size"] * sizes.embedding_row_bytes + experts == \
        on_disk
    # A Mamba layer's state: conv (conv_dim x (d_conv - 1), model dtype) + SSM (fp32).
    heads, head_dim, n = SMOKE["mamba_num_heads"], SMOKE["mamba_head_dim"], SMOKE["ssm_state_size"]
    conv_dim = heads * head_dim + 2 * SMOKE["n_groups"] * n
    per_layer = conv_dim * (SMOKE["conv_kernel"] - 1) * 2 + heads * head_dim * n * 4
    assert sizes.slot_bytes == SMOKE["hybrid_override_pattern"].count("M") * per_layer
    assert sizes.kv_token_bytes == 2 * SMOKE["num_key_value_heads"] * SMOKE["head_dim"] * 2
    # Batch 1 touches top-k experts per MoE layer; the state counts read + write.
    per, e, k = sizes.expert_bytes[0]
    one = sizes.dense_bytes + sizes.embedding_row_bytes + 3 * per * k + 2 * sizes.slot_bytes \
        + 11 * sizes.kv_token_bytes
    assert sizes.step_bytes(1, context=10) == pytest.approx(one)


def test_row_cells_and_verdict(bench):
    engine = bench.Phases(prefill_s=0.5, decode_step_s=0.010, decode_tokens=16 * 32,
                          first_tokens=list(range(16)))
    hf = bench.Phases(prefill_s=2.0, decode_step_s=0.120, decode_tokens=16 * 32,
                      first_tokens=[*range(15), 99])
    row = bench.Row(16, engine, hf, roofline_s=0.004, step_bytes=12e9, prompt_len=512)
    cells = dict(zip(bench.HEADER, row.cells()))
    assert cells["engine prefill tok/s"] == "16,384" and cells["hf prefill tok/s"] == "4,096"
    assert cells["prefill speedup"] == "4.0x" and cells["decode speedup"] == "12.0x"
    assert cells["engine decode tok/s"] == "1,600" and cells["hf decode tok/s"] == "133"
    assert cells["step MB"] == "12,000.0" and cells["engine % of roofline"] == "40%"
    assert cells["same first token"] == "15/16"
    assert "12.0x, met" in bench.verdict([row])
    slow = bench.Row(16, engine, bench.Phases(2.0, 0.05, 1), 0.004, 12e9, 512)
    assert "5.0x, NOT met" in bench.verdict([slow])
    oom = bench.Row(16, engine, None, 0.004, 12e9, 512, hf_note="OOM")
    assert dict(zip(bench.HEADER, oom.cells()))["decode speedup"] == "OOM"
    assert "not measured" in bench.verdict([oom])


def test_tied_embeddings_count_as_dense(bench, tmp_path):
    """Untied, the lm_head matrix is dense and the embedding counts by rows; tied, the one
    matrix is read whole every step: dense, with no rows beside it. Same dense total."""
    from shapes import SMOKE

    untied = bench.model_sizes(*_loaded(tmp_path / "untied", SMOKE))
    tied = bench.model_sizes(*_loaded(tmp_path / "tied", {**SMOKE, "tie_word_embeddings": True}))
    assert untied.embedding_row_bytes == SMOKE["hidden_size"] * 2
    assert tied.embedding_row_bytes == 0
    assert tied.dense_bytes == untied.dense_bytes


def _loaded(path, config):
    from baton.workers.engine import Engine, EngineConfig
    from baton.workers.model import load_model
    from baton.workers.model.checkpoint import write_random_checkpoint

    write_random_checkpoint(path, config, dtype=torch.bfloat16, tokenizer=False)
    model = load_model(path, dtype=torch.bfloat16, kernels="torch")
    return model, Engine(model, EngineConfig(num_pages=8, max_num_seqs=1, max_model_len=64))
