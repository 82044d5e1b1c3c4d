"""`baton quantize`: a ModelOpt-convention checkpoint that baton's loader reads, with the
routed experts and large linears quantized and everything NVIDIA keeps 16-bit left alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from baton.kernels import QuantExperts, QuantLinear, WeightFormat, nvfp4
from baton.workers import quantize
from baton.workers.model import load_model

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny"


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def reference():
    return load_model(TINY, dtype=torch.float32)


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("Hello! How are you today? The model reads a prompt one token at a time.\n"
                    * 20)
    return path


@pytest.mark.parametrize("fmt, weight_format", [("nvfp4", WeightFormat.NVFP4),
                                                ("fp8", WeightFormat.FP8)])
def test_quantized_checkpoint_loads_with_the_right_formats(tmp_path, reference, fmt,
                                                           weight_format, capsys):
    out = tmp_path / fmt
    assert quantize.main([str(TINY), str(out), "--format", fmt]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["quantization"]["quant_algo"] == fmt.upper()
    config = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert config["exclude_modules"][:2] == ["lm_head", "mtp*"]
    assert "backbone.layers.2.mixer.fc1_latent_proj" in config["exclude_modules"]
    assert (out / "tokenizer.json").read_bytes() == (TINY / "tokenizer.json").read_bytes()

    model = load_model(out, dtype=torch.float32)
    formats = {name: m.fmt for name, m in model.named_modules()
               if isinstance(m, (QuantLinear, QuantExperts))}
    for name, found in formats.items():
        kept = (name == "lm_head" or name.startswith("mtp.") or "latent_proj" in name)
        assert found == (WeightFormat.BF16 if kept else weight_format), name
    assert formats["backbone.layers.0.mixer.in_proj"] == weight_format
    assert formats["backbone.layers.2.mixer.experts"] == weight_format
    assert formats["backbone.layers.2.mixer.shared_experts.up_proj"] == weight_format
    # 16-bit tensors are copied bit for bit.
    for name in ("backbone.layers.2.mixer.gate.weight", "backbone.embeddings.weight",
                 "backbone.layers.0.mixer.conv1d.weight", "mtp.layers.0.eh_proj.weight"):
        assert torch.equal(model.state_dict()[name], reference.state_dict()[name]), name

    ids = torch.tensor([[5, 17, 300, 42, 9, 77, 128, 3, 64, 200, 11, 6]])
    with torch.no_grad():
        expected, got = reference(ids), model(ids)
    # A random model amplifies weight error (routing flips); the trained demo model's
    # perplexity is the real figure (benchmarks/demo). Here: close, and far from noise.
    cosine = F.cosine_similarity(got.flatten(), expected.flatten(), dim=0)
    print(fmt, rel_err(got, expected), float(cosine))
    assert cosine > (0.8 if fmt == "nvfp4" else 0.98)


def test_nvfp4_tensors_are_the_kernels_quantization(tmp_path):
    out = tmp_path / "q"
    quantize.quantize_checkpoint(TINY, out, "nvfp4", [])
    with safe_open(str(TINY / "model.safetensors"), "pt") as src, \
            safe_open(str(out / "model.safetensors"), "pt") as dst:
        for name in ("backbone.layers.2.mixer.experts.3.up_proj",
                     "backbone.layers.0.mixer.out_proj"):
            packed, block, global_scale = nvfp4.quantize(src.get_tensor(f"{name}.weight").float())
            assert torch.equal(dst.get_tensor(f"{name}.weight"), packed)
            assert torch.equal(dst.get_tensor(f"{name}.weight_scale").float(), block.float())
            assert torch.equal(dst.get_tensor(f"{name}.weight_scale_2"), global_scale)
            assert dst.get_tensor(f"{name}.input_scale").item() == 1.0


def test_calibration_sets_input_scales(tmp_path, calibration_file, reference, capsys):
    out = tmp_path / "calibrated"
    assert quantize.main([str(TINY), str(out), "--format", "nvfp4",
                          "--calibration", str(calibration_file)]) == 0
    assert "no --calibration" not in capsys.readouterr().err
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        linear = f.get_tensor("backbone.layers.0.mixer.in_proj.input_scale").item()
        experts = [f.get_tensor(f"backbone.layers.2.mixer.experts.{e}.down_proj.input_scale")
                   .item() for e in range(8)]
    # The in_proj input is RMS-normalised (amax of order 1..10), far from the unit default.
    assert 1e-4 < linear < 0.01
    assert any(s != 1.0 for s in experts) and all(s > 0 for s in experts)
    model = load_model(out, dtype=torch.float32)
    assert model.backbone.layers[0].mixer.in_proj.input_scale.item() == pytest.approx(linear)


def test_refuses_what_it_cannot_quantize(tmp_path, capsys):
    done = tmp_path / "done"
    quantize.quantize_checkpoint(TINY, done, "fp8", [])
    assert quantize.main([str(done), str(tmp_path / "again"), "--format", "nvfp4"]) == 2
    assert "already quantized" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert quantize.main([str(TINY), str(busy), "--format", "nvfp4"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (busy / "keep.txt").read_text() == "mine"
    assert quantize.main([str(tmp_path), str(tmp_path / "x"), "--format", "fp8"]) == 2
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        quantize.main([str(TINY), str(tmp_path / "y"), "--format", "int4"])


def test_stacked_transformers_experts_are_written_per_expert(tmp_path):
    # transformers' save_pretrained stacks the experts: [E, I, K] under experts.up_proj.
    src = tmp_path / "stacked"
    shutil.copytree(TINY, src)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src / "model.safetensors"))
    for layer in (2, 5, 7):
        for proj in ("up_proj", "down_proj"):
            prefix = f"backbone.layers.{layer}.mixer.experts"
            if f"{prefix}.0.{proj}.weight" not in tensors:
                continue
            stack = [tensors.pop(f"{prefix}.{e}.{proj}.weight") for e in range(8)]
            tensors[f"{prefix}.{proj}"] = torch.stack(stack)
    save_file(tensors, str(src / "model.safetensors"))
    quantize.quantize_checkpoint(src, tmp_path / "out", "nvfp4", [])
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "backbone.layers.2.mixer.experts.7.down_proj.weight_scale" in names
    assert not any(n.endswith("experts.up_proj") for n in names)
    load_model(tmp_path / "out", dtype=torch.float32)


def test_subcommand_help_loads_no_torch():
    for command in ("quantize", "perplexity"):
        code = ("import sys, baton.workers.cli as c\n"
                f"try:\n    c.main(['{command}', '--help'])\nexcept SystemExit:\n    pass\n"
                "heavy = [m for m in ('torch', 'safetensors') if m in sys.modules]\n"
                "assert not heavy, heavy")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert f"baton {command}" in out.stdout
