"""write_random_checkpoint: a complete random Nemotron-H checkpoint for tests and demos;
save_model: a trained model's weights in the same layout.

It writes what a released checkpoint holds: config.json, model.safetensors with the hub
tensor names (`backbone.`, per-expert `experts.{e}.up_proj.weight`), hf_quant_config.json and
ModelOpt-quantized tensors when asked, and a byte-level BPE tokenizer (tokenizer.json,
tokenizer_config.json with a ChatML-like chat template, generation_config.json). The same
arguments always give the same files.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from baton.kernels import QuantExperts, QuantLinear, WeightFormat
from baton.workers.text.chat_template import NEMOTRON3_CHAT_TEMPLATE

from .config import NemotronHConfig
from .layers import FormatPlan
from .model import NemotronHModel
from .quant import plan_from_section

QUANTIZATIONS = (None, "nvfp4", "fp8", "mixed", "w4a16_nvfp4", "fp8_per_channel_per_token")
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # ids 0..4
# Activation range the random checkpoints calibrate their input scales to (the GPU FP8 path
# quantizes activations with it; the reference path does not use it).
INPUT_AMAX = 16.0

# The Nemotron 3 chat format (chat_template.py): tools, tool calls, tool results, reasoning.
CHAT_TEMPLATE = NEMOTRON3_CHAT_TEMPLATE

# Training text of the tokenizer: plain English about the things this project serves.
CORPUS = """\
The model reads a prompt one token at a time and writes an answer one token at a time.
A token is a short piece of text: a word, part of a word, a space and a word, or a sign.
Most layers of this model are state space layers. Each keeps a small state that it updates
with every new token, so the cost of a step does not grow with the length of the text.
A few layers are attention layers. They look back at every earlier token, and they keep the
keys and values of those tokens in a cache made of pages.
Other layers are mixtures of experts. A router picks a few experts for each token, and only
those experts do any work, which is why a large model can still answer quickly.
When a request arrives, one worker reads the whole prompt. Then it hands the state of every
layer to another worker, which writes the answer. The hand over is called the baton.
Hello! How are you today? I am fine, thank you. What would you like to know?
Please write a short poem about the sea. The sea is wide and the sea is deep; the waves
roll in while the sailors sleep.
Tell me a story about a cat and a dog. Once upon a time, a small cat lived next to a big
dog. Every morning they met at the gate, and every evening they walked home together.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 1000 2026. Lists: first, second, third.
Questions and answers make up much of the text people send: who, what, where, when, why
and how. The answer should be clear, short and correct.
The weather today is sunny with a light wind from the west. Tomorrow it may rain.
Code looks like this: def add(a, b): return a + b. print(add(2, 3)) prints 5.
"""


def write_random_checkpoint(path: str | Path, config: dict[str, Any], seed: int = 0,
                            dtype: torch.dtype = torch.bfloat16,
                            quantization: str | None = None, tokenizer: bool = True) -> Path:
    """Writes a random checkpoint of the architecture `config` (a config.json dictionary) to
    `path` and returns it.

    quantization: None (all `dtype`), "nvfp4" (every quantizable linear and expert stack in
    NVFP4; lm_head, routers and MTP stay 16-bit), "w4a16_nvfp4" (the same without input
    scales), "fp8", "fp8_per_channel_per_token", or "mixed" (the Ultra layout: NVFP4 routed
    experts, FP8 shared experts and Mamba linears, 16-bit attention and the rest).
    tokenizer: also write a byte-level BPE tokenizer with vocab_size entries at most.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization: {quantization!r} is not one of {QUANTIZATIONS}")
    raw = {"model_type": "nemotron_h", **config}
    parsed = NemotronHConfig.from_dict(raw)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _remove_weights(path)

    # The structure only: each tensor is drawn on its own (module by module), so even a
    # full-size architecture never sits in memory in fp32 at once.
    with torch.device("meta"):
        model = NemotronHModel(parsed, dtype=torch.float32)
    quant_section = _quant_section(model, quantization)
    formats = (plan_from_section(quant_section, "hf_quant_config.json", "exclude_modules")
               if quant_section else FormatPlan())
    tensors = _checkpoint_tensors(model, formats, dtype, seed)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})

    _write_config(path, raw, dtype)
    if quant_section:
        hf_quant = {"producer": {"name": "modelopt", "version": "0.0.0"},
                    "quantization": quant_section}
        (path / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=2) + "\n")
    if tokenizer:
        write_tokenizer(path, parsed.vocab_size)
    return path


def random_tensor(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    """A plausible fp32 value for the checkpoint tensor `name`, chosen by its role. Each
    tensor has its own generator (seed and name), so the order of drawing does not matter."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if name.endswith("A_log"):
        return torch.log(1 + 15 * torch.rand(shape, generator=gen))
    if name.endswith("dt_bias"):
        low, high = math.log(0.02), math.log(0.5)
        dt = torch.exp(low + (high - low) * torch.rand(shape, generator=gen))
        return dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    noise = torch.randn(shape, generator=gen)
    module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    if name.endswith(".D") or "norm" in module:
        return 1 + 0.1 * noise
    if name.endswith("e_score_correction_bias"):
        return 0.1 * noise
    if name == "backbone.embeddings.weight":
        return noise
    if len(shape) == 1:
        return 0.02 * noise
    return noise / math.sqrt(shape[-1])


def _quant_section(model: NemotronHModel, quantization: str | None) -> dict[str, Any] | None:
    if quantization is None:
        return None
    if quantization != "mixed":
        return {"quant_algo": quantization.upper(), "kv_cache_quant_algo": None,
                "group_size": 16, "exclude_modules": ["lm_head", "mtp*"]}
    layers: dict[str, dict[str, str]] = {}
    for i, block in enumerate(model.backbone.layers):
        prefix = f"backbone.layers.{i}.mixer"
        if block.kind == "mamba":
            for proj in ("in_proj", "out_proj"):
                layers[f"{prefix}.{proj}"] = {"quant_algo": "FP8"}
        elif block.kind == "moe":
            for e in range(model.config.n_routed_experts):
                for proj in ("up_proj", "down_proj"):
                    layers[f"{prefix}.experts.{e}.{proj}"] = {"quant_algo": "NVFP4"}
            if block.mixer.shared_experts is not None:
                for proj in ("up_proj", "down_proj"):
                    layers[f"{prefix}.shared_experts.{proj}"] = {"quant_algo": "FP8"}
    return {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None, "group_size": 16,
            "exclude_modules": ["lm_head", "mtp*"], "quantized_layers": layers}


def _checkpoint_tensors(model: NemotronHModel, formats: FormatPlan, dtype: torch.dtype,
                        seed: int) -> dict[str, torch.Tensor]:
    """Random tensors for every tensor of the (meta) model, in `dtype`, quantized where
    `formats` says, with hub names (per-expert tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    handled: set[str] = set()
    tied = model.config.tie_word_embeddings
    for module_name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            handled.update(f"{module_name}.{k}" for k in module.state_dict())
            if module_name == "lm_head" and tied:
                continue  # the embedding is written once
            fmt, per_channel = formats.format_for(module_name)
            weight = random_tensor(f"{module_name}.weight", module.weight.shape, seed)
            bias = (None if module.bias is None
                    else random_tensor(f"{module_name}.bias", module.bias.shape, seed))
            quantized = QuantLinear.from_float(weight, fmt, dtype, bias=bias,
                                               fp8_per_channel=per_channel,
                                               input_amax=INPUT_AMAX)
            for key, value in quantized.state_dict().items():
                tensors[f"{module_name}.{key}"] = value
        elif isinstance(module, QuantExperts):
            handled.update(f"{module_name}.{k}" for k in module.state_dict())
            fmt, per_channel = formats.format_for(module_name)
            up = random_tensor(f"{module_name}.up_weight", module.up_weight.shape, seed)
            down = random_tensor(f"{module_name}.down_weight", module.down_weight.shape, seed)
            stack = QuantExperts.from_float(up, down, fmt, dtype, fp8_per_channel=per_channel)
            del up, down
            _set_expert_input_scales(stack)
            tensors.update(per_expert_tensors(module_name, stack.state_dict()))
    for name, meta in model.state_dict().items():
        if name in handled:
            continue
        keep_fp32 = name.endswith("e_score_correction_bias")
        value = random_tensor(name, meta.shape, seed)
        tensors[name] = value.to(torch.float32 if keep_fp32 else dtype)
    return {name: t.contiguous() for name, t in sorted(tensors.items())}


def per_expert_tensors(module_name: str, stack: dict[str, torch.Tensor]
                       ) -> dict[str, torch.Tensor]:
    """A QuantExperts state dict (`up_weight` [E, ...]) under its hub names, one tensor per
    expert (`{module_name}.{e}.up_proj.weight`)."""
    tensors = {}
    for key, value in stack.items():
        proj, _, tensor_name = key.partition("_")
        for e in range(value.shape[0]):
            tensors[f"{module_name}.{e}.{proj}_proj.{tensor_name}"] = value[e].clone()
    return tensors


def save_model(model: NemotronHModel, path: str | Path, config: dict[str, Any],
               dtype: torch.dtype = torch.bfloat16) -> Path:
    """Writes a (trained, unquantized) model as a checkpoint: model.safetensors with the hub
    names in `dtype` (the router's correction bias stays fp32; a tied lm_head is written as
    well) and config.json from `config` (a config.json dictionary describing `model`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _remove_weights(path)
    experts = {name for name, module in model.named_modules() if isinstance(module, QuantExperts)}
    tensors: dict[str, torch.Tensor] = {}
    stacks: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in model.state_dict().items():
        module_name, _, key = name.rpartition(".")
        if module_name in experts:
            stacks.setdefault(module_name, {})[key] = value.detach().to(dtype)
        else:
            # lm_head.weight too when it is tied to the embedding: transformers' NemotronH
            # never ties (it would start the head from random weights).
            keep_fp32 = name.endswith("e_score_correction_bias")
            tensors[name] = value.detach().to(torch.float32 if keep_fp32 else dtype)
    for module_name, stack in stacks.items():
        tensors.update(per_expert_tensors(module_name, stack))
    tensors = {name: t.contiguous() for name, t in sorted(tensors.items())}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    _write_config(path, {"model_type": "nemotron_h", **config}, dtype)
    return path


def _remove_weights(path: Path) -> None:
    # Weights and quantization files of an earlier checkpoint in this folder would be read
    # together with the new ones.
    for stale in [*path.glob("*.safetensors"), path / "model.safetensors.index.json",
                  path / "hf_quant_config.json"]:
        stale.unlink(missing_ok=True)


def _write_config(path: Path, raw: dict[str, Any], dtype: torch.dtype) -> None:
    out_config = {"architectures": ["NemotronHForCausalLM"], **raw,
                  "torch_dtype": str(dtype).removeprefix("torch.")}
    (path / "config.json").write_text(json.dumps(out_config, indent=2, sort_keys=True) + "\n")


def _set_expert_input_scales(stack: QuantExperts) -> None:
    with torch.no_grad():
        for prefix in ("up", "down"):
            scale = getattr(stack, f"{prefix}_input_scale", None)
            if scale is None:
                continue
            if stack.fmt is WeightFormat.FP8:
                scale.fill_(INPUT_AMAX / 448.0)
            else:
                scale.fill_(INPUT_AMAX / (6.0 * 448.0))


def write_tokenizer(path: str | Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer trained on CORPUS (at most vocab_size entries; special
    tokens <pad> <s> </s> <|im_start|> <|im_end|> are ids 0..4), its tokenizer_config.json
    with the chat template, and generation_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size: {vocab_size} is too small for a byte-level tokenizer (needs >= "
            f"{minimum}); pass tokenizer=False")
    path = Path(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    tok.save(str(path / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<pad>",
        "add_bos_token": False, "add_eos_token": False,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(i): {"content": t, "special": True} for i, t in enumerate(SPECIAL_TOKENS)},
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    generation = {"bos_token_id": 1, "eos_token_id": [2, 4], "pad_token_id": 0}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
