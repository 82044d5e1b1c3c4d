"""The demo model benchmark runs end to end on the tiny model (perplexity in three formats,
speculation at 0/1/2 drafts, parity, agent loop, completions) and writes its report."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "demo" / "bench_demo.py"


def _module():
    """The benchmark script as a module (registered, as an import would be)."""
    spec = importlib.util.spec_from_file_location("bench_demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_demo_smoke_writes_the_report(tmp_path):
    results = _module().main(["--smoke", "--out", str(tmp_path)])
    (report,) = tmp_path.glob("*-demo-model.md")
    saved = json.loads(report.with_suffix(".json").read_text())
    assert saved["perplexity"].keys() == {"bf16", "nvfp4", "fp8"}
    assert all(saved["perplexity"][f]["tokens"] > 100 for f in ("bf16", "nvfp4", "fp8"))
    assert saved["perplexity"]["nvfp4"]["size_bytes"] < saved["perplexity"]["bf16"]["size_bytes"]
    spec_figures = results["speculation"]
    assert set(spec_figures) == {0, 1, 2}
    # Greedy output is the same with speculation on and off (coupled verification).
    assert all(s["outputs_identical"] for s in spec_figures.values())
    assert spec_figures[0]["acceptance"] is None and spec_figures[2]["drafted"] > 0
    text = report.read_text()
    for heading in ("Held-out perplexity", "MTP speculative decoding", "transformers parity",
                    "Calculator agent loop", "Greedy Python completions"):
        assert heading in text


@pytest.mark.parametrize("value, message", [
    ("tpu", "--spec-device: 'tpu': allowed: cpu, cuda, cuda:N"),
    ("cuda:x", "--spec-device: 'cuda:x': allowed: cpu, cuda, cuda:N"),
])
def test_bad_spec_device_is_refused_with_what_is_allowed(value, message, capsys):
    with pytest.raises(SystemExit) as stop:
        _module().main(["--smoke", "--spec-device", value])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_spec_device_cuda_without_a_device_is_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        _module().main(["--smoke", "--spec-device", "cuda"])
    assert stop.value.code == 2
    assert "--spec-device: 'cuda', but this torch sees no CUDA device" in (
        capsys.readouterr().err)


@pytest.mark.gpu
def test_bench_demo_smoke_speculates_on_the_gpu(tmp_path):
    results = _module().main(["--smoke", "--spec-device", "cuda", "--out", str(tmp_path)])
    assert "bf16, Triton kernels" in results["speculation_setup"]["device"]
    assert all(s["outputs_identical"] for s in results["speculation"].values())
    assert results["speculation"][2]["drafted"] > 0
