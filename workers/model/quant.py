"""Which weight format each module of a checkpoint holds, from its quantization config.

Two spellings (ModelOpt): `hf_quant_config.json` {"producer", "quantization": {quant_algo,
kv_cache_quant_algo, group_size, exclude_modules, quantized_layers}} and config.json
`quantization_config` {quant_method: "modelopt", quant_algo, ignore, quantized_layers, ...}.
quant_algo NVFP4 | W4A16_NVFP4 | FP8 | FP8_PER_CHANNEL_PER_TOKEN | MIXED_PRECISION (then
quantized_layers maps module names to their own quant_algo; modules not named stay 16-bit).
`name*` in an exclude list means the module and everything under it.

Module names are compared in the model's spelling (`backbone.`), whatever prefix the
checkpoint uses (`model.`, `language_model.`).
"""

from __future__ import annotations

import json
import logging
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from baton.kernels import WeightFormat

from .layers import FormatPlan

log = logging.getLogger(__name__)

ALGO_FORMATS: dict[str, tuple[WeightFormat, bool]] = {
    "NVFP4": (WeightFormat.NVFP4, False),
    "W4A16_NVFP4": (WeightFormat.W4A16_NVFP4, False),
    "FP8": (WeightFormat.FP8, False),
    "FP8_PER_CHANNEL_PER_TOKEN": (WeightFormat.FP8, True),
}
MIXED = "MIXED_PRECISION"
# These modules are never quantized in this family's checkpoints (DESIGN.md, Checkpoints):
# the lm_head and the MTP sublayers stay 16-bit unless quantized_layers names them.
ALWAYS_16BIT_PREFIXES = ("lm_head", "mtp.")


def canonical_name(name: str) -> str:
    """A checkpoint tensor or module name in the model's spelling (`backbone.` prefix)."""
    while True:
        for prefix in ("language_model.", "model.language_model."):
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        else:
            break
    if name.startswith("model."):
        name = "backbone." + name[len("model."):]
    elif name.split(".", 1)[0] in ("layers", "embeddings", "norm_f"):
        name = "backbone." + name
    if name.startswith("backbone.mtp."):
        name = name[len("backbone."):]  # MTP weights sit beside the backbone, not in it
    return name


def _parse_algo(value: Any, field: str) -> tuple[WeightFormat, bool] | None:
    if value is None or value == "" or str(value).upper() in ("NONE", "BF16", "FP16"):
        return None
    algo = str(value).upper()
    if algo not in ALGO_FORMATS:
        allowed = ", ".join([*ALGO_FORMATS, MIXED])
        raise ValueError(f"{field}: unknown quant_algo {value!r}; allowed: {allowed}")
    return ALGO_FORMATS[algo]


class QuantizationPlan(FormatPlan):
    """The formats a quantized checkpoint declares, module by module."""

    def __init__(self, quant_algo: str, exclude: list[str], quantized_layers: dict[str, Any],
                 kv_cache_quant_algo: str | None, source: str):
        self.source = source
        self.mixed = str(quant_algo).upper() == MIXED
        self.default = None if self.mixed else _parse_algo(quant_algo, f"{source}: quant_algo")
        if not self.mixed and self.default is None:
            raise ValueError(f"{source}: quant_algo {quant_algo!r} names no quantization")
        if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
            raise ValueError(f"{source}: exclude_modules must be a list of names, got {exclude!r}")
        self.exclude = [canonical_name(p) if not p.startswith("*") else p for p in exclude]
        if not isinstance(quantized_layers, dict):
            raise ValueError(
                f"{source}: quantized_layers must map module names to their algo, got "
                f"{type(quantized_layers).__name__}")
        self.layers: dict[str, tuple[WeightFormat, bool] | None] = {}
        for name, entry in quantized_layers.items():
            algo = entry.get("quant_algo") if isinstance(entry, dict) else entry
            self.layers[canonical_name(name)] = _parse_algo(
                algo, f"{source}: quantized_layers[{name!r}]")
        if self.mixed and not self.layers:
            raise ValueError(f"{source}: quant_algo MIXED_PRECISION needs quantized_layers")
        self.kv_cache_quant_algo = kv_cache_quant_algo

    def _excluded(self, name: str) -> bool:
        return any(fnmatchcase(name, p) for p in self.exclude)

    def format_for(self, module_name: str) -> tuple[WeightFormat, bool]:
        name = canonical_name(module_name)
        is_experts = name.endswith(".experts")
        candidates = [name]
        if is_experts:
            candidates += [f"{name}.0.up_proj", f"{name}.0.down_proj"]
        listed = self._listed(name, is_experts)
        if listed is not False:
            chosen = listed
        elif self.mixed or name.startswith(ALWAYS_16BIT_PREFIXES):
            chosen = None
        elif any(self._excluded(c) for c in candidates):
            chosen = None
        else:
            chosen = self.default
        return chosen if chosen is not None else (WeightFormat.BF16, False)

    def _listed(self, name: str, is_experts: bool):
        """The algo quantized_layers gives this module; False when it names none."""
        if name in self.layers:
            return self.layers[name]
        if not is_experts:
            return False
        found = {v for k, v in self.layers.items() if k.startswith(name + ".")}
        if not found:
            return False
        if len(found) > 1:
            raise ValueError(
                f"{self.source}: quantized_layers gives the experts of {name} different formats "
                f"{sorted(str(f) for f in found)}; one expert stack holds one format")
        return found.pop()


def load_quantization(path: str | Path, raw_config: dict[str, Any]) -> FormatPlan:
    """The checkpoint's format plan: a QuantizationPlan, or a plain (all 16-bit) FormatPlan."""
    path = Path(path)
    hf_file = path / "hf_quant_config.json"
    if hf_file.exists():
        data = json.loads(hf_file.read_text())
        section = data.get("quantization")
        if not isinstance(section, dict):
            raise ValueError("hf_quant_config.json: missing the 'quantization' object")
        return plan_from_section(section, "hf_quant_config.json", exclude_key="exclude_modules")
    section = raw_config.get("quantization_config")
    if section is None:
        return FormatPlan()
    if not isinstance(section, dict):
        raise ValueError(f"quantization_config: must be an object, got {section!r}")
    method = section.get("quant_method", "modelopt")
    if method != "modelopt":
        raise ValueError(
            f"quantization_config.quant_method: {method!r} is not supported; allowed: 'modelopt'")
    return plan_from_section(section, "config.json quantization_config", exclude_key="ignore")


def _algo_from_config_groups(groups: Any, source: str) -> str:
    """The quant_algo that compressed-tensors style config_groups describe (one group)."""
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"{source}: missing quant_algo (and no config_groups to infer it)")
    algos = set()
    for name, group in groups.items():
        if not isinstance(group, dict):
            raise ValueError(f"{source}: config_groups[{name!r}] must be an object")
        weights = group.get("weights") or {}
        bits, kind = weights.get("num_bits"), weights.get("type", "float")
        activations = group.get("input_activations")
        if bits == 4 and kind == "float" and weights.get("group_size", 16) == 16:
            algos.add("NVFP4" if activations else "W4A16_NVFP4")
        elif bits == 8 and kind == "float":
            per_channel = weights.get("strategy") == "channel"
            algos.add("FP8_PER_CHANNEL_PER_TOKEN" if per_channel else "FP8")
        else:
            raise ValueError(
                f"{source}: config_groups[{name!r}] weights {weights} are neither NVFP4 nor FP8")
    if len(algos) > 1:
        raise ValueError(f"{source}: config_groups mix {sorted(algos)}; give quantized_layers")
    return algos.pop()


def plan_from_section(section: dict[str, Any], source: str, exclude_key: str) -> FormatPlan:
    """The QuantizationPlan of one quantization section (hf_quant_config.json's
    "quantization" or config.json's quantization_config); `source` names it in errors."""
    algo = section.get("quant_algo")
    if algo is None:
        algo = _algo_from_config_groups(section.get("config_groups"), source)
    group_size = section.get("group_size")
    nvfp4 = str(algo).upper() in ("NVFP4", "W4A16_NVFP4")
    if group_size is not None and nvfp4 and group_size != 16:
        raise ValueError(f"{source}: group_size {group_size} is not 16 (NVFP4 blocks are 16)")
    exclude = section.get(exclude_key, section.get("exclude_modules", section.get("ignore", [])))
    kv_algo = section.get("kv_cache_quant_algo")
    if kv_algo:
        log.warning("%s: kv_cache_quant_algo %s is ignored; the KV cache stays in the model "
                    "dtype", source, kv_algo)
    return QuantizationPlan(algo, exclude or [], section.get("quantized_layers") or {},
                            kv_algo, source)
