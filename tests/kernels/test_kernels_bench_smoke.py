"""The GPU benchmark script runs end to end on tiny CPU shapes (its checks, formulas and
report), so the H100 run does not find a broken script."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels" / "bench_moe.py"


def test_bench_moe_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_moe_smoke", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    out = tmp_path / "moe.md"
    assert bench.main(["--smoke", "--tokens", "3", "--out", str(out)]) == 0
    report = out.read_text()
    assert "| smoke | 3 | nvfp4 |" in report and "| smoke (48x64) | 3 | nvfp4 |" in report
    assert "FAILED" not in report
    assert bench.expert_bytes(bench.MOE_SHAPES[0], "nvfp4") == 2 * 1856 * 2688 * 0.5625 + 8
