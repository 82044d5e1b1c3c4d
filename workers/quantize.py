"""`baton quantize IN_DIR OUT_DIR --format nvfp4|fp8`: a 16-bit checkpoint -> a ModelOpt-convention
quantized checkpoint that baton's loader (and ModelOpt-aware engines) read.

What is quantized follows NVIDIA's recipes for this family (DESIGN.md, Checkpoints): the
routed experts and the large linears (Mamba in/out projections, attention q/k/v/o, the shared
experts); norms, the router gate and its correction bias, embeddings, the convolution, the
LatentMoE latent projections (fc1/fc2_latent_proj), lm_head and every MTP tensor stay 16-bit
and are listed in `exclude_modules` of hf_quant_config.json. Tensors follow the ModelOpt
names: NVFP4 `weight` uint8 [N, K/2], `weight_scale` e4m3 [N, K/16], `weight_scale_2` fp32,
`input_scale` fp32; FP8 `weight` e4m3 [N, K], `weight_scale` fp32, `input_scale` fp32; routed
experts one set per expert (`experts.{e}.up_proj.*`).

Input scales (the activation range a GPU path that quantizes activations uses: NVFP4 on
Blackwell, FP8) come from `--calibration FILE...`: the model runs over those texts and each
quantized linear (each expert) records its input's absolute maximum. Without calibration text
they are 1.0, which keeps activations up to 2688 (NVFP4) or 448 (FP8) representable; the W4A16
paths (CPU, Hopper) do not use them.

Memory: one shard of the input at a time (each input shard becomes one output shard), plus
the model itself while calibrating.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

FORMATS = {"nvfp4": "NVFP4", "fp8": "FP8"}
# Modules that stay 16-bit beside lm_head and the MTP depth (always 16-bit in this family).
KEPT_16BIT = re.compile(r"\.(fc1|fc2)_latent_proj$")
WEIGHT_FILES = re.compile(
    r"(\.safetensors|^model\.safetensors\.index\.json|^hf_quant_config\.json)$")


class QuantizeError(ValueError):
    """An input that cannot be quantized (the message says why)."""


def quantization_targets(config) -> tuple[set[str], set[str], list[str]]:
    """(linear modules to quantize, expert stacks to quantize, modules kept 16-bit) of the
    architecture `config`, in the model's spelling (`backbone.`)."""
    import torch

    from baton.kernels import QuantExperts, QuantLinear
    from baton.workers.model.model import NemotronHModel

    with torch.device("meta"):
        model = NemotronHModel(config, dtype=torch.bfloat16)
    linears, experts, kept = set(), set(), ["lm_head", "mtp*"]
    for name, module in model.named_modules():
        if name == "lm_head" or name.startswith("mtp."):
            continue
        if isinstance(module, QuantExperts):
            experts.add(name)
        elif isinstance(module, QuantLinear):
            if KEPT_16BIT.search(name):
                kept.append(name)
            else:
                linears.add(name)
    return linears, experts, kept


class Calibration:
    """Input absolute maxima of the quantized linears and of each routed expert's up and down
    projections, from forward passes over calibration text."""

    def __init__(self, model, linears: set[str], experts: set[str]):
        self.amax: dict[str, float] = {}
        self.handles = []
        for name, module in model.named_modules():
            if name in linears:
                self.handles.append(module.register_forward_pre_hook(self._linear_hook(name)))
            elif name in experts:
                self.handles.append(module.register_forward_pre_hook(self._experts_hook(name)))

    def _record(self, key: str, value) -> None:
        self.amax[key] = max(self.amax.get(key, 0.0), float(value))

    def _linear_hook(self, name: str):
        def hook(_module, args):
            self._record(name, args[0].abs().max())
        return hook

    def _experts_hook(self, name: str):
        import torch

        def hook(stack, args):
            x, topk_ids = args[0], args[1]
            for e in torch.unique(topk_ids).tolist():
                rows = (topk_ids == e).any(dim=1)
                xs = x[rows].float()
                self._record(f"{name}.{e}.up_proj", xs.abs().max())
                # The down projection's input: relu2 of the up projection, as the expert runs.
                up = stack.dequantized_weight("up", e - stack.expert_range[0])
                self._record(f"{name}.{e}.down_proj", torch.relu(xs @ up.T).square().max())
        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def calibrate(in_dir: Path, files: list[Path], max_tokens: int, linears: set[str],
              experts: set[str]) -> dict[str, float]:
    """Runs the 16-bit model over up to max_tokens tokens of `files`; returns input amaxes."""
    import torch

    from baton.workers.model import load_model
    from baton.workers.text.tokenizer import load_tokenizer

    model = load_model(in_dir, dtype=torch.float32, kernels="torch")
    tokenizer = load_tokenizer(in_dir)
    ids: list[int] = []
    for path in files:
        ids += tokenizer.encode(path.read_bytes().decode("utf-8", errors="replace"))
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    if len(ids) < 2:
        raise QuantizeError("--calibration: the files hold fewer than 2 tokens")
    window = min(model.max_model_len, 1024)
    calibration = Calibration(model, linears, experts)
    try:
        with torch.inference_mode():
            for start in range(0, len(ids), window):
                model(torch.tensor([ids[start:start + window]]))
    finally:
        calibration.close()
    return calibration.amax


def _quantized(weight, fmt: str, input_amax: float | None) -> dict:
    import torch

    from baton.kernels import QuantLinear

    layer = QuantLinear.from_float(weight.float(), fmt, dtype=torch.bfloat16,
                                   input_amax=input_amax)
    return {k: v for k, v in layer.state_dict().items() if k != "bias"}


def quantize_checkpoint(in_dir: Path, out_dir: Path, fmt: str, calibration_files: list[Path],
                        calibration_tokens: int = 8192, progress_stream=None) -> dict:
    """Writes the quantized checkpoint; returns the hf_quant_config.json it wrote."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from baton.workers.model.config import NemotronHConfig
    from baton.workers.model.loader import PER_EXPERT, STACKED_EXPERT, checkpoint_files
    from baton.workers.model.quant import canonical_name
    from baton.workers.progress import Progress

    if fmt not in FORMATS:
        raise QuantizeError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if not (in_dir / "config.json").is_file():
        raise QuantizeError(f"{in_dir}: no config.json (not a checkpoint folder)")
    if in_dir.resolve() == out_dir.resolve():
        raise QuantizeError("OUT_DIR must differ from IN_DIR")
    raw = json.loads((in_dir / "config.json").read_text())
    if (in_dir / "hf_quant_config.json").exists() or raw.get("quantization_config"):
        raise QuantizeError(f"{in_dir}: already quantized (it has a quantization config)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise QuantizeError(f"{out_dir}: exists and is not empty")
    config = NemotronHConfig.from_dict(raw)
    linears, experts, kept = quantization_targets(config)
    amax = (calibrate(in_dir, calibration_files, calibration_tokens, linears, experts)
            if calibration_files else {})
    files = checkpoint_files(in_dir)

    out_dir.mkdir(parents=True, exist_ok=True)
    for path in in_dir.iterdir():
        if path.is_file() and not WEIGHT_FILES.search(path.name):
            shutil.copy2(path, out_dir / path.name)
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as shard:
            total += len(list(shard.keys()))
    weight_map: dict[str, str] = {}
    counts = {"quantized": 0, "kept": 0}
    with Progress(total, f"quantize {FORMATS[fmt]}", unit="tensor",
                  stream=progress_stream) as progress:
        for file in files:
            tensors: dict[str, torch.Tensor] = {}
            with safe_open(str(file), framework="pt") as shard:
                for disk_name in shard.keys():
                    name = canonical_name(disk_name)
                    value = shard.get_tensor(disk_name)
                    quantized = _quantize_tensor(name, disk_name, value, fmt, linears, experts,
                                                 amax, PER_EXPERT, STACKED_EXPERT)
                    if quantized is None:
                        tensors[disk_name] = value
                        counts["kept"] += 1
                    else:
                        tensors.update(quantized)
                        counts["quantized"] += 1
                    progress.update(1)
            save_file({k: v.contiguous() for k, v in sorted(tensors.items())},
                      str(out_dir / file.name), metadata={"format": "pt"})
            weight_map.update({k: file.name for k in tensors})
    if len(files) > 1:
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    hf_quant = {
        "producer": {"name": "baton", "version": _version()},
        "quantization": {"quant_algo": FORMATS[fmt], "kv_cache_quant_algo": None,
                         **({"group_size": 16} if fmt == "nvfp4" else {}),
                         "exclude_modules": kept},
    }
    (out_dir / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=2) + "\n")
    return {**hf_quant, "tensors": counts, "calibrated": bool(amax)}


def _quantize_tensor(name, disk_name, value, fmt, linears, experts, amax, per_expert, stacked):
    """The quantized tensors replacing one checkpoint tensor (by disk name), or None to keep it."""
    if name.endswith(".weight") and name[: -len(".weight")] in linears:
        module = name[: -len(".weight")]
        prefix = disk_name[: -len(".weight")]
        return {f"{prefix}.{k}": v for k, v in _quantized(value, fmt, amax.get(module)).items()}
    match = per_expert.match(name)
    if match and match["module"] in experts:
        if match["tensor"] != "weight":
            raise QuantizeError(f"{disk_name}: already a quantization tensor")
        module = f"{match['module']}.{match['expert']}.{match['proj']}_proj"
        prefix = disk_name[: -len(".weight")]
        return {f"{prefix}.{k}": v for k, v in _quantized(value, fmt, amax.get(module)).items()}
    match = stacked.match(name)
    if match and match["module"] in experts:
        # transformers' stacked [E, N, K] experts: written per expert, as the hub spells them.
        base = disk_name[: disk_name.rindex(".experts") + len(".experts")]
        out = {}
        for e in range(value.shape[0]):
            module = f"{match['module']}.{e}.{match['proj']}_proj"
            for k, v in _quantized(value[e], fmt, amax.get(module)).items():
                out[f"{base}.{e}.{match['proj']}_proj.{k}"] = v
        return out
    return None


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("baton")
    except Exception:  # an uninstalled source tree
        return "0"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="baton quantize",
        description="Quantize a 16-bit Nemotron-H checkpoint (ModelOpt NVFP4 or FP8).")
    parser.add_argument("in_dir", type=Path, metavar="IN_DIR")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    parser.add_argument("--format", choices=sorted(FORMATS), required=True)
    parser.add_argument("--calibration", type=Path, nargs="+", default=[], metavar="FILE",
                        help="text files for the activation ranges (input scales)")
    parser.add_argument("--calibration-tokens", type=int, default=8192,
                        help="tokens of calibration text to run (default 8192)")
    args = parser.parse_args(argv)
    for path in args.calibration:
        if not path.is_file():
            parser.error(f"--calibration: {path}: no such file")
    if args.calibration_tokens < 2:
        parser.error(f"--calibration-tokens: {args.calibration_tokens} must be >= 2")
    try:
        result = quantize_checkpoint(args.in_dir, args.out_dir, args.format, args.calibration,
                                     args.calibration_tokens)
    except (ValueError, FileNotFoundError) as err:
        print(f"baton quantize: {err}", file=sys.stderr)
        return 2
    if not result["calibrated"]:
        print("baton quantize: no --calibration text: input scales are 1.0 (used only where "
              "activations are quantized too: NVFP4 on Blackwell, FP8)", file=sys.stderr)
    print(json.dumps(result))
    return 0
