"""The constrained-decoding benchmark runs end to end on tiny shapes on the CPU, so the GPU run
does not find a broken script; its synthetic tokenizer is a real byte-level BPE."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "engine" / "bench_constrained.py"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_constrained_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_constrained_smoke_writes_the_table(bench, tmp_path):
    assert bench.main(["--smoke", "--threads", "1", "--out", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("*-cpu-constrained.md")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-cpu-constrained\.md", report.name)
    text = report.read_text()
    assert "llguidance " in text and "torch " in text
    rows = [line for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "4"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == len(bench.HEADER)
        assert all(float(c.rstrip("x")) > 0 for c in cells), row
    figures = json.loads(report.with_suffix(".json").read_text())
    assert [r["batch"] for r in figures["rows"]] == [1, 4]
    assert all(r["mask_us"]["json"] > 0 and r["mask_us"]["plain"] == 0 for r in figures["rows"])


def test_synthetic_tokenizer_is_a_byte_level_bpe_of_the_asked_size(bench):
    tok = bench.synthetic_tokenizer(3000)
    assert tok.get_vocab_size() == 3000
    text = 'Hello {"name": "zip"} 123'
    assert tok.decode(tok.encode(text).ids) == text
    assert max(len(t) for t in tok.get_vocab()) <= 16


def test_bench_constrained_refuses_bad_arguments(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--smoke", "--batches", "1,0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--smoke", "--batches", "x"])
