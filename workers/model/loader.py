"""load_model: a checkpoint folder (config.json, safetensors shards, optional quantization
config) -> NemotronHModel on a device.

The model is built on the meta device, given real storage on the target device, and filled
tensor by tensor from memory-mapped safetensors, so a checkpoint is never held twice in host
memory. Names are mapped to the model's spelling (`backbone.`; `model.` and
`language_model.` prefixes accepted); per-expert tensors `experts.{e}.up_proj.weight` (and
their scales) are stacked into QuantExperts' `up_weight[e]`, transformers' stacked
`experts.up_proj` into `up_weight`. Any missing or unexpected tensor or shape mismatch is an
error naming it.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import torch
from safetensors import safe_open

from baton.kernels import QuantExperts
from baton.kernels.formats import BACKEND_CHOICES, check_backend

from .config import NemotronHConfig
from .model import NemotronHModel
from .quant import canonical_name, load_quantization

log = logging.getLogger(__name__)

PER_EXPERT = re.compile(
    r"^(?P<module>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>up|down)_proj\."
    r"(?P<tensor>weight|weight_scale|weight_scale_2|input_scale)$")
STACKED_EXPERT = re.compile(r"^(?P<module>.+\.experts)\.(?P<proj>up|down)_proj(\.weight)?$")
KV_SCALE = re.compile(r"\.(k_scale|v_scale|kv_scale)$")
# Checkpoints past this size report progress while loading.
PROGRESS_BYTES = 1 << 30


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model its config describes."""


def load_model(path: str | Path, dtype: torch.dtype = torch.bfloat16,
               device: str | torch.device = "cpu", kernels: str = "auto", ep_group=None,
               max_model_len: int | None = None) -> NemotronHModel:
    """Loads a Nemotron-H checkpoint.

    dtype: the model dtype (activations, 16-bit weights, KV cache). kernels: "auto" |
    "torch" | "triton": the cached path's Mamba2 and attention kernels and the quantized
    modules' (NemotronHModel.set_kernels; "auto" = triton on CUDA). ep_group: a
    torch.distributed group; each rank then holds and loads only its share of every expert
    stack (baton.kernels.ep.shard_experts). max_model_len: the longest sequence served
    (default and upper bound: max_position_embeddings).
    """
    check_backend(kernels, field="kernels", choices=BACKEND_CHOICES)
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json")
    raw = json.loads((path / "config.json").read_text())
    config = NemotronHConfig.from_dict(raw)
    if max_model_len is not None and max_model_len > config.max_position_embeddings:
        raise ValueError(
            f"max_model_len: {max_model_len} exceeds the checkpoint's max_position_embeddings="
            f"{config.max_position_embeddings}")
    formats = load_quantization(path, raw)
    device = torch.device(device)
    with torch.device("meta"):
        model = NemotronHModel(config, dtype=dtype, formats=formats, max_model_len=max_model_len)
    if ep_group is not None:
        _shard_experts(model, ep_group)
    model.to_empty(device=device)
    _check_no_non_persistent(model)
    load_weights(model, path, ignore_kv_scales=getattr(formats, "kv_cache_quant_algo", None))
    model.tie_weights()
    model.set_kernels(kernels)
    model.eval()
    model.requires_grad_(False)
    return model


def _shard_experts(model: NemotronHModel, ep_group) -> None:
    try:
        from baton.kernels.ep import shard_experts
    except ImportError as err:
        raise ValueError(
            f"ep_group: expert parallelism needs baton.kernels.ep.shard_experts ({err})") from err
    shard_experts(model, ep_group)


def _check_no_non_persistent(model: NemotronHModel) -> None:
    # Nothing in the model keeps derived values in non-persistent buffers; this guards that
    # assumption, since to_empty leaves them uninitialised.
    persistent = set(model.state_dict(keep_vars=True))
    for name, _ in model.named_buffers():
        if name not in persistent:
            raise RuntimeError(f"non-persistent buffer {name} would stay uninitialised")


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({path / name for name in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors files")
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{path}: the index names {f.name}, which does not exist")
    return files


class _Targets:
    """Where each checkpoint tensor goes in the model."""

    def __init__(self, model: NemotronHModel):
        self.params = dict(model.state_dict(keep_vars=True))
        # Checkpoint module name (`...mixer.experts`) -> (model module name, module). The two
        # differ when expert parallelism wraps the stack in another module.
        self.experts: dict[str, tuple[str, QuantExperts]] = {}
        for name, module in model.named_modules():
            if isinstance(module, QuantExperts):
                checkpoint_name = name[: name.rindex(".experts") + len(".experts")]
                self.experts[checkpoint_name] = (name, module)
        self.tied = model.config.tie_word_embeddings
        # Per stacked expert tensor: the expert indices still to load.
        self.expert_todo: dict[str, set[int]] = {}
        for module_name, module in self.experts.values():
            first, last = module.expert_range
            for key in self.params:
                if key.startswith(module_name + "."):
                    self.expert_todo[key] = set(range(first, last))
        self.plain_todo = {k for k in self.params if k not in self.expert_todo}
        if self.tied:
            self.plain_todo.discard("lm_head.weight")
        # Model tensor -> the checkpoint name it came from (two names for one tensor, e.g.
        # `backbone.` and `model.` spellings side by side, are an error, not an overwrite).
        self.sources: dict[str, str] = {}

    def claim(self, key: str, disk_name: str) -> None:
        earlier = self.sources.setdefault(key, disk_name)
        if earlier != disk_name:
            raise CheckpointError(
                f"{disk_name}: duplicate of {earlier} (both are the model's {key})")


def load_weights(model: NemotronHModel, path: Path, ignore_kv_scales=None) -> None:
    """Copies every checkpoint tensor into the model; errors name what does not fit."""
    files = checkpoint_files(path)
    targets = _Targets(model)
    unexpected: list[str] = []
    # A checkpoint may ship MTP weights that its config does not use (transformers ignores
    # them the same way).
    skip_mtp = model.mtp is None
    skipped_mtp = 0
    progress = _Progress(files)
    for number, file in enumerate(files, 1):
        with safe_open(str(file), framework="pt", device="cpu") as shard:
            names = list(shard.keys())
            for index, disk_name in enumerate(names, 1):
                name = canonical_name(disk_name)
                if ignore_kv_scales and KV_SCALE.search(name):
                    continue
                if skip_mtp and name.startswith("mtp."):
                    skipped_mtp += 1
                    continue
                if not _load_one(targets, name, disk_name, shard):
                    unexpected.append(disk_name)
                progress.update(number, index / len(names))
    if skipped_mtp:
        log.info("%s: skipped %d MTP tensors (num_nextn_predict_layers is 0)", path, skipped_mtp)
    problems = []
    if unexpected:
        problems.append(f"unexpected tensors (the config has no place for them): "
                        f"{_listing(unexpected)}")
    missing = sorted(targets.plain_todo)
    for key, todo in sorted(targets.expert_todo.items()):
        if todo:
            module, tensor = key.rsplit(".", 1)
            proj, _, rest = tensor.partition("_")
            missing.append(f"{module}.{{{_ranges(todo)}}}.{proj}_proj.{rest}")
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))


class _Progress:
    """Logs every tenth of a large checkpoint as it loads (by bytes of the shards read)."""

    def __init__(self, files: list[Path]):
        self.sizes = [f.stat().st_size for f in files]
        self.total = sum(self.sizes)
        self.enabled = self.total >= PROGRESS_BYTES
        self.next_mark = 0.1
        self.started = time.monotonic()

    def update(self, shard_number: int, shard_fraction: float) -> None:
        if not self.enabled:
            return
        done = sum(self.sizes[: shard_number - 1]) + shard_fraction * self.sizes[shard_number - 1]
        fraction = done / self.total if self.total else 1.0
        if fraction + 1e-9 < self.next_mark:
            return
        while self.next_mark <= fraction + 1e-9:
            self.next_mark += 0.1
        log.info("loading weights: shard %d/%d, %.1f/%.1f GiB (%.0f%%), %.0f s", shard_number,
                 len(self.sizes), done / 2**30, self.total / 2**30, 100 * fraction,
                 time.monotonic() - self.started)


def _load_one(targets: _Targets, name: str, disk_name: str, shard) -> bool:
    match = PER_EXPERT.match(name)
    if match and match["module"] in targets.experts:
        module_name, module = targets.experts[match["module"]]
        key = f"{module_name}.{match['proj']}_{match['tensor']}"
        if key not in targets.params:
            return False
        expert = int(match["expert"])
        if expert >= module.num_experts:
            return False
        first, last = module.expert_range
        if not first <= expert < last:
            return True  # another expert-parallel rank holds it
        param = targets.params[key]
        targets.claim(f"{key}[{expert}]", disk_name)
        _copy(param[expert - first], shard.get_tensor(disk_name), disk_name, f"{key}[{expert}]")
        targets.expert_todo[key].discard(expert)
        return True
    match = STACKED_EXPERT.match(name)
    if match and match["module"] in targets.experts:
        module_name, module = targets.experts[match["module"]]
        key = f"{module_name}.{match['proj']}_weight"
        first, last = module.expert_range
        tensor = shard.get_slice(disk_name)
        shape = tensor.get_shape()
        if len(shape) != 3 or shape[0] != module.num_experts:
            raise CheckpointError(
                f"{disk_name}: shape {list(shape)} does not stack {module.num_experts} experts "
                f"for {key} {list(targets.params[key].shape)}")
        for expert in range(module.num_experts):
            targets.claim(f"{key}[{expert}]", disk_name)
        _copy(targets.params[key], tensor[first:last], disk_name, key)
        targets.expert_todo[key].clear()
        return True
    if name not in targets.params:
        if targets.tied and name == "lm_head.weight":
            return True  # tied: the embedding is the lm_head
        return False
    targets.claim(name, disk_name)
    _copy(targets.params[name], shard.get_tensor(disk_name), disk_name, name)
    targets.plain_todo.discard(name)
    return True


def _copy(target: torch.Tensor, source: torch.Tensor, disk_name: str, key: str) -> None:
    if tuple(source.shape) != tuple(target.shape):
        if source.numel() == target.numel() and [d for d in source.shape if d != 1] == [
                d for d in target.shape if d != 1]:
            source = source.reshape(target.shape)  # e.g. per-channel scales [N, 1] vs [N]
        else:
            raise CheckpointError(
                f"{disk_name}: shape {list(source.shape)} ({source.dtype}) does not match the "
                f"model's {key} {list(target.shape)} ({target.dtype}); check the config's sizes "
                "and the quantization config")
    quantized = (torch.uint8, torch.float8_e4m3fn)
    if (source.dtype in quantized or target.dtype in quantized) and source.dtype != target.dtype:
        raise CheckpointError(
            f"{disk_name}: dtype {source.dtype} does not match the model's {key} {target.dtype}; "
            "the quantization config and the tensors disagree")
    with torch.no_grad():
        target.copy_(source)


def _ranges(indices: set[int]) -> str:
    ordered = sorted(indices)
    if len(ordered) > 4:
        return f"{ordered[0]}..{ordered[-1]} ({len(ordered)} experts)"
    return ",".join(str(i) for i in ordered)


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
