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


def test_bench_engine_smoke_writes_the_table(bench, tables, tmp_path):
    # fp32: both sides then agree to rounding, so the check below can demand every token.
    assert bench.main(["--smoke", "--batches", "1,3", "--dtype", "float32",
                       "--out", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("*-cpu-engine.md")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-cpu-engine\.md", report.name)
    text = report.read_text()
    assert "torch " in text and "triton " in text and "transformers " in text
    header = dict(zip(tables.HEADER, range(len(tables.HEADER))))
    rows = [line for line in text.splitlines() if re.match(r"\| \d+ \|.*/", line)]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "3"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == len(tables.HEADER)
        assert all(c not in ("", "-", "inf", "nan") for c in cells), row
        assert float(cells[header["engine prefill tok/s"]].replace(",", "")) > 0
        assert float(cells[header["eager step ms"]]) > 0
        assert float(cells[header["step MB"]].replace(",", "")) > 0
        # No CUDA here: the graphs columns say so rather than repeat the eager figures.
        assert cells[header["graphs step ms"]] == cells[header["graphs x roofline"]] == "n/a"
        assert cells[-1] == f"{cells[0]}/{cells[0]}"  # the same greedy first tokens
    parity = float(re.search(r"relative error ([0-9.e+-]+)", text).group(1))
    assert parity < 1e-4
    assert "FAILED" not in text and "no CUDA graphs on this device" in text
    # The prefill-alone row, and a verdict line per target.
    (prefill,) = [line for line in text.splitlines() if line.startswith("| 48 |")]
    assert float(prefill.split("|")[3].replace(",", "")) > 0  # tokens/s
    assert "batch-1 decode step within 2x of the bf16 roofline" in text
    assert "Prefill at 48 tokens:" in text and "of the bf16 GEMM rate" in text
    figures = json.loads(report.with_suffix(".json").read_text())
    assert [r["batch"] for r in figures["rows"]] == [1, 3]
    for r in figures["rows"]:
        assert r["engine"]["decode_step_seconds"] > 0 and r["transformers"]["prefill_seconds"] > 0
        assert r["eager"]["decode_step_seconds"] > 0
        assert r["roofline_step_seconds"] == pytest.approx(
            r["step_bytes"] / figures["hbm_bytes_per_second"])
    assert figures["prefill"]["tokens"] == 48 and figures["prefill"]["flops"] > 0
    assert figures["bf16_gemm_flops_per_second"] > 0 and figures["cuda_graphs"] is False


def test_bench_engine_smoke_with_nvfp4_weights(bench, tmp_path):
    """The NVFP4 engine is checked against its own reference path; transformers (skipped
    here) would run the bf16 checkpoint beside it, written into the same folder."""
    assert bench.main(["--smoke", "--weights", "nvfp4", "--batches", "1", "--skip-hf",
                       "--prefill-tokens", "0", "--checkpoint", str(tmp_path / "ckpt"),
                       "--out", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("*-cpu-engine-nvfp4.md")
    text = report.read_text()
    assert "nvfp4 weights" in text and "its torch reference path" in text
    assert "within 3x of the nvfp4 roofline" in text
    assert (tmp_path / "ckpt" / "nvfp4" / "hf_quant_config.json").exists()
    assert (tmp_path / "ckpt" / "bf16" / "config.json").exists()


@pytest.fixture(scope="module")
def tables(bench):
    """benchmarks/engine/engine_report.py (importable once the script put its folder on the
    path)."""
    import engine_report

    return engine_report


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


def test_row_cells_and_verdict(tables):
    engine = tables.Phases(prefill_s=0.5, decode_step_s=0.010, decode_tokens=16 * 32,
                          first_tokens=list(range(16)))
    hf = tables.Phases(prefill_s=2.0, decode_step_s=0.120, decode_tokens=16 * 32,
                      first_tokens=[*range(15), 99])
    row = tables.Row(16, engine, hf, roofline_s=0.004, step_bytes=12e9, prompt_len=512)
    cells = dict(zip(tables.HEADER, row.cells()))
    assert cells["engine prefill tok/s"] == "16,384" and cells["hf prefill tok/s"] == "4,096"
    assert cells["prefill speedup"] == "4.0x" and cells["decode speedup"] == "12.0x"
    assert cells["graphs decode tok/s"] == "1,600" and cells["hf decode tok/s"] == "133"
    assert cells["step MB"] == "12,000.0" and cells["graphs x roofline"] == "2.5x"
    assert cells["same first token"] == "15/16"
    assert "12.0x, met" in tables.verdict([row])
    eager = tables.Phases(prefill_s=0.5, decode_step_s=0.040, decode_tokens=16 * 32)
    both = tables.Row(16, engine, hf, 0.004, 12e9, 512, eager=eager)
    assert dict(zip(tables.HEADER, both.cells()))["eager x roofline"] == "10.0x"
    one = tables.Row(1, tables.Phases(0.1, 0.007, 32), None, 0.004, 1e9, 512)
    assert "1.8x, met" in tables.roofline_verdict([one], "bf16")
    assert "1.8x, met" in tables.roofline_verdict([one], "nvfp4")
    slow_one = tables.Row(1, tables.Phases(0.1, 0.0125, 32), None, 0.004, 1e9, 512)
    assert "3.1x, NOT met" in tables.roofline_verdict([slow_one], "nvfp4")
    prefill = tables.PrefillRow(tokens=4096, seconds=0.01, flops=4e12, gemm_peak=800e12)
    assert "409,600 tokens/s, 400.0 TFLOP/s = 50% of the bf16 GEMM rate" in \
        tables.prefill_verdict(prefill)
    slow = tables.Row(16, engine, tables.Phases(2.0, 0.05, 1), 0.004, 12e9, 512)
    assert "5.0x, NOT met" in tables.verdict([slow])
    oom = tables.Row(16, engine, None, 0.004, 12e9, 512, hf_note="OOM")
    assert dict(zip(tables.HEADER, oom.cells()))["decode speedup"] == "OOM"
    assert "not measured" in tables.verdict([oom])


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
