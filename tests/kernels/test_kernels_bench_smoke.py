"""The GPU benchmark scripts run end to end on tiny CPU shapes (their checks, formulas and
report), so the H100 run does not find a broken script."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

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


HOT_PATH = SCRIPT.parent / "bench_hot_path.py"


def load_hot_path():
    spec = importlib.util.spec_from_file_location("bench_hot_path_smoke", HOT_PATH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    return bench


def test_bench_hot_path_smoke(tmp_path):
    bench = load_hot_path()
    out = tmp_path / "hot-path.md"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    report = out.read_text()
    for case in ("| ssm decode | B=3 |", "| conv decode | B=3 |",
                 "| attention decode | B=3 ctx=21 |", "| ssm verify 1+3 | B=3 |",
                 "| attention verify 1+3 |", "| scan prefill | T=19 |", "| conv prefill | T=19 |",
                 "| attention prefill | T=19 cached=0 |", "| attention prefill | T=4 cached=15 |"):
        assert case in report, case
    assert "FAILED" not in report
    # The formulas: a roofline of 1 us at 1 TB/s for 1 MB, 2x slower at 2 us.
    row = bench.Row("x", "B=1", 2e-6, 3e-6, 1e6, 0.0, 4e-6, 0.0)
    cells = row.cells(hbm=1e12, peak=1e15)
    assert cells[5] == "500" and cells[8] == "1.0" and cells[9] == "2.00x" and cells[10] == "2.0x"


def test_bench_hot_path_refuses_without_cuda_and_bad_cases(capsys):
    bench = load_hot_path()
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--what", "decode,sampling"])
    assert "sampling" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.main([])
        assert "needs a CUDA device" in capsys.readouterr().err
