"""Quantized checkpoints (ModelOpt NVFP4 / FP8 / mixed precision): formats come from the
quantization config, tensors load, and logits stay close to a 16-bit model holding the
dequantized weights."""

from __future__ import annotations

import json

import pytest
import torch

from baton.kernels import QuantExperts, QuantLinear, WeightFormat
from baton.workers.model import NemotronHModel, load_model
from baton.workers.model.checkpoint import write_random_checkpoint
from baton.workers.model.quant import load_quantization

CONFIG = dict(
    vocab_size=128, hidden_size=32, hybrid_override_pattern="M*E-", num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, intermediate_size=48, mamba_num_heads=4,
    mamba_head_dim=8, ssm_state_size=8, n_groups=2, chunk_size=8, n_routed_experts=4,
    num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=32,
    moe_latent_size=16, num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E",
)


def dequantized_reference(model: NemotronHModel) -> NemotronHModel:
    """A model of the same dtype, all formats 16-bit, holding `model`'s dequantized weights."""
    dtype = model.dtype
    reference = NemotronHModel(model.config, dtype=dtype)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, module in model.named_modules():
            target = modules[name]
            if isinstance(module, QuantLinear):
                target.weight.copy_(module.dequantized_weight(dtype))
            elif isinstance(module, QuantExperts):
                for prefix in ("up", "down"):
                    stacked = getattr(target, f"{prefix}_weight")
                    for e in range(module.num_local_experts):
                        stacked[e].copy_(module.dequantized_weight(prefix, e, dtype))
        own = reference.state_dict()
        for key, value in model.state_dict().items():
            owner = key.rsplit(".", 1)[0]
            if not isinstance(modules.get(owner), (QuantLinear, QuantExperts)):
                own[key].copy_(value)
    return reference.eval()


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def logits_pair(path, dtype=torch.bfloat16):
    model = load_model(path, dtype=dtype, kernels="torch")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 11), generator=gen)
    return model, model(ids), dequantized_reference(model)(ids)


def assert_bf16_close(got, expected):
    # Between two bf16 paths a rounding difference can flip a near-tied expert choice for a
    # token (routing is discontinuous), so bf16 is checked token by token with a share;
    # exactness is asserted in fp32 (assert_close_to_dequantized).
    per_token = (got - expected).abs().amax(-1) / expected.abs().amax(-1)
    assert float((per_token < 5e-2).float().mean()) >= 0.8
    assert float((got - expected).norm() / expected.norm()) < 0.1


def assert_close_to_dequantized(path):
    # fp32 activations: the quantized modules compute exactly x @ dequantize(W).T.
    _, got, expected = logits_pair(path, torch.float32)
    assert rel_err(got, expected) < 1e-4


def test_nvfp4_checkpoint_loads_and_matches_dequantized_reference(tmp_path):
    path = write_random_checkpoint(tmp_path, CONFIG, seed=1, quantization="nvfp4",
                                   tokenizer=False)
    quant = json.loads((path / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "NVFP4"
    model, got, expected = logits_pair(path)
    layers = model.backbone.layers
    assert layers[0].mixer.in_proj.fmt is WeightFormat.NVFP4
    assert layers[0].mixer.in_proj.weight.dtype == torch.uint8
    assert layers[1].mixer.q_proj.fmt is WeightFormat.NVFP4
    assert layers[2].mixer.experts.fmt is WeightFormat.NVFP4
    assert layers[3].mixer.up_proj.fmt is WeightFormat.NVFP4
    assert model.lm_head.fmt is WeightFormat.BF16
    assert model.mtp.layers[1].mixer.experts.fmt is WeightFormat.BF16  # MTP stays 16-bit
    assert torch.isfinite(got).all()
    assert_bf16_close(got, expected)
    assert_close_to_dequantized(path)


def test_mixed_precision_checkpoint_takes_formats_per_module(tmp_path):
    path = write_random_checkpoint(tmp_path, CONFIG, seed=2, quantization="mixed",
                                   tokenizer=False)
    model, got, expected = logits_pair(path)
    mamba, attention, moe, mlp = (block.mixer for block in model.backbone.layers)
    assert mamba.in_proj.fmt is WeightFormat.FP8 and mamba.out_proj.fmt is WeightFormat.FP8
    assert attention.q_proj.fmt is WeightFormat.BF16
    assert moe.experts.fmt is WeightFormat.NVFP4
    assert moe.shared_experts.up_proj.fmt is WeightFormat.FP8
    assert moe.fc1_latent_proj.fmt is WeightFormat.BF16
    assert mlp.up_proj.fmt is WeightFormat.BF16
    assert_bf16_close(got, expected)
    assert_close_to_dequantized(path)


def test_fp8_checkpoint_runs(tmp_path):
    path = write_random_checkpoint(tmp_path, CONFIG, seed=3, quantization="fp8", tokenizer=False)
    model, got, expected = logits_pair(path)
    assert model.backbone.layers[2].mixer.experts.up_weight.dtype == torch.float8_e4m3fn
    assert_bf16_close(got, expected)
    assert_close_to_dequantized(path)


@pytest.mark.parametrize("quantization, fmt, per_channel", [
    ("w4a16_nvfp4", WeightFormat.W4A16_NVFP4, False),
    ("fp8_per_channel_per_token", WeightFormat.FP8, True),
])
def test_other_modelopt_algorithms_load(tmp_path, quantization, fmt, per_channel):
    path = write_random_checkpoint(tmp_path, CONFIG, seed=4, quantization=quantization,
                                   tokenizer=False)
    model = load_model(path, dtype=torch.float32, kernels="torch")
    in_proj = model.backbone.layers[0].mixer.in_proj
    assert in_proj.fmt is fmt and in_proj.fp8_per_channel is per_channel
    assert not hasattr(in_proj, "input_scale")  # neither algorithm carries one
    assert model.backbone.layers[2].mixer.experts.fmt is fmt
    assert_close_to_dequantized(path)


def test_rewriting_a_folder_leaves_no_stale_quantization(tmp_path):
    write_random_checkpoint(tmp_path, CONFIG, seed=5, quantization="nvfp4", tokenizer=False)
    write_random_checkpoint(tmp_path, CONFIG, seed=5, tokenizer=False)
    assert not (tmp_path / "hf_quant_config.json").exists()
    model = load_model(tmp_path, dtype=torch.float32)
    assert model.backbone.layers[0].mixer.in_proj.fmt is WeightFormat.BF16


def _plan(tmp_path, quantization_config):
    return load_quantization(tmp_path, {"quantization_config": quantization_config})


def test_config_json_quantization_config_with_ignore_patterns(tmp_path):
    plan = _plan(tmp_path, {
        "quant_method": "modelopt", "quant_algo": "FP8_PER_CHANNEL_PER_TOKEN",
        "ignore": ["lm_head", "model.layers.1.mixer*", "*shared_experts*"]})
    assert plan.format_for("backbone.layers.0.mixer.in_proj") == (WeightFormat.FP8, True)
    assert plan.format_for("backbone.layers.1.mixer.q_proj") == (WeightFormat.BF16, False)
    assert plan.format_for("backbone.layers.10.mixer.in_proj") == (WeightFormat.FP8, True)
    shared = plan.format_for("backbone.layers.2.mixer.shared_experts.up_proj")
    assert shared[0] is WeightFormat.BF16
    assert plan.format_for("lm_head")[0] is WeightFormat.BF16
    w4a16 = _plan(tmp_path, {"quant_method": "modelopt", "quant_algo": "W4A16_NVFP4"})
    assert w4a16.format_for("backbone.layers.2.mixer.experts")[0] is WeightFormat.W4A16_NVFP4


def test_quant_algo_inferred_from_config_groups(tmp_path):
    nvfp4 = {"weights": {"num_bits": 4, "type": "float", "group_size": 16},
             "input_activations": {"num_bits": 4, "type": "float", "group_size": 16},
             "targets": ["Linear"]}
    plan = _plan(tmp_path, {"quant_method": "modelopt", "config_groups": {"group_0": nvfp4},
                            "ignore": ["lm_head"]})
    assert plan.format_for("backbone.layers.0.mixer.in_proj")[0] is WeightFormat.NVFP4
    fp8 = {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}
    plan = _plan(tmp_path, {"quant_method": "modelopt", "config_groups": {"g": fp8}})
    assert plan.format_for("backbone.layers.0.mixer.in_proj") == (WeightFormat.FP8, True)
    with pytest.raises(ValueError, match="neither NVFP4 nor FP8"):
        _plan(tmp_path, {"quant_method": "modelopt",
                         "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}})


@pytest.mark.parametrize("section, message", [
    ({"quant_method": "modelopt", "quant_algo": "INT3"}, "INT3"),
    ({"quant_method": "gptq", "quant_algo": "NVFP4"}, "quant_method"),
    ({"quant_method": "modelopt"}, "quant_algo"),
    ({"quant_method": "modelopt", "quant_algo": "MIXED_PRECISION"}, "quantized_layers"),
])
def test_bad_quantization_configs_are_named(tmp_path, section, message):
    with pytest.raises(ValueError, match=message):
        _plan(tmp_path, section)


def test_experts_with_two_formats_are_refused(tmp_path):
    plan = _plan(tmp_path, {"quant_method": "modelopt", "quant_algo": "MIXED_PRECISION",
                            "quantized_layers": {
                                "model.layers.2.mixer.experts.0.up_proj": "NVFP4",
                                "model.layers.2.mixer.experts.1.up_proj": "FP8"}})
    with pytest.raises(ValueError, match="different formats"):
        plan.format_for("backbone.layers.2.mixer.experts")
