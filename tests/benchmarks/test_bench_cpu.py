"""The CPU benchmark runs end to end on a tiny random checkpoint (eager and compiled engines,
MTP on, transformers, op counts, report), so that its one long run does not find a broken
script."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from baton.workers.model.checkpoint import write_random_checkpoint

pytestmark = pytest.mark.timeout(1800)  # compiles 5 graphs; bounds a hang only

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "engine" / "bench_cpu.py"


def test_bench_cpu_smoke_writes_the_table(tmp_path, small_hybrid_config):
    spec = importlib.util.spec_from_file_location("bench_cpu_smoke", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    # 64 positions: the copy with a longer max_position_embeddings is exercised too.
    checkpoint = write_random_checkpoint(tmp_path / "ckpt", small_hybrid_config, seed=1,
                                         dtype=torch.float32, tokenizer=False)
    out = tmp_path / "out"
    assert bench.main(["--checkpoint", str(checkpoint), "--batches", "1,2", "--prompt-len",
                       "8", "--decode-steps", "2", "--prefill", "96", "--mtp", "0,1",
                       "--rounds", "1", "--out", str(out)]) == 0
    (report,) = out.glob("*-cpu-step.md")
    text = report.read_text()
    assert "load averages before" in text and "torch " in text and "transformers " in text
    rows = [line for line in text.splitlines() if re.match(r"\| [12] \|", line)]
    assert len(rows) == 2 and all(line.count("—") == 0 for line in rows)
    figures = json.loads(report.with_suffix(".json").read_text())
    decode = figures["decode_tokens_per_s"]
    assert set(decode) == {"1", "2"}
    assert set(decode["2"]) == {"eager", "compiled", "eager+mtp1", "compiled+mtp1", "hf"}
    assert all(v["tokens_per_s"] > 0 for row in decode.values() for v in row.values())
    # MTP steps emit the target's token and the accepted drafts: 1 to 2 per sequence.
    assert all(1.0 <= decode[b][n]["tokens_per_step"] <= 2.0 for b in decode
               for n in ("eager+mtp1", "compiled+mtp1"))
    assert set(figures["prefill_tokens_per_s"]["96"]) == {"eager", "compiled", "hf"}
    ops = figures["ops_per_decode_step_batch1"]
    assert ops["eager_aten_ops"] > ops["compiled_kernel_calls"] > 0
    assert ops["compiled_generated_kernels"] > 0
    assert set(figures["compile_seconds"]) == {"compiled", "compiled+mtp1"}
    assert "batch-1 compiled vs eager" in text
