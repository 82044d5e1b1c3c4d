"""Bad input gets a clear error: config fields, checkpoint tensors, prompts past the context,
malformed batches."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from baton.workers.model import CheckpointError, ForwardBatch, NemotronHConfig, load_model

BASE = dict(vocab_size=64, hidden_size=32, hybrid_override_pattern="M*E-",
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, mamba_num_heads=4,
            mamba_head_dim=8, ssm_state_size=8, n_groups=2, n_routed_experts=4,
            num_experts_per_tok=2)


@pytest.mark.parametrize("change, message", [
    ({"hybrid_override_pattern": "M*X-"}, r"hybrid_override_pattern: unknown layer character 'X'"),
    ({"mtp_hybrid_override_pattern": "*Q", "num_nextn_predict_layers": 1}, "'Q'"),
    ({"num_hidden_layers": 5}, "num_hidden_layers: 5"),
    ({"layers_block_type": ["mamba", "moe", "moe", "mlp"]}, "layers_block_type"),
    ({"num_key_value_heads": 3}, "num_key_value_heads: 3"),
    ({"n_groups": 3}, "n_groups: 3"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok: 5"),
    ({"n_group": 2, "topk_group": 3}, "topk_group: 3"),
    ({"mlp_hidden_act": "gelu"}, "mlp_hidden_act"),
    ({"mamba_ssm_cache_dtype": "int8"}, "mamba_ssm_cache_dtype"),
    ({"sliding_window": 128}, "sliding_window"),
    ({"frobnicate": 1}, "frobnicate: unknown config field"),
    ({"mamba_n_groups": 4}, "mamba_n_groups"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"num_nextn_predict_layers": 1, "mtp_hybrid_override_pattern": "M"}, "Mamba"),
    ({"model_type": "llama"}, "model_type"),
])
def test_config_errors_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        NemotronHConfig.from_dict({**BASE, **change})


def test_config_reads_both_spellings():
    hub = NemotronHConfig.from_dict({**BASE, "mamba_d_conv": 3, "time_step_limit": [0.0, 1e38],
                                     "num_hidden_layers": 4})
    saved = NemotronHConfig.from_dict({
        **{k: v for k, v in BASE.items() if k != "hybrid_override_pattern"},
        "layers_block_type": ["linear_attention", "full_attention", "moe", "mlp"],
        "conv_kernel": 3, "time_step_limit": [0.0, {"__float__": "Infinity"}]})
    assert hub == saved
    assert hub.layer_kinds == ["mamba", "attention", "moe", "mlp"]
    assert hub.hybrid_override_pattern == "M*E-"
    assert NemotronHConfig.from_dict(hub.to_dict()) == hub


def test_config_of_a_dense_hub_checkpoint():
    """The fields of a released dense Nemotron-H config.json (8B layout, shrunk)."""
    hub = {
        "architectures": ["NemotronHForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "attention_head_dim": 8, "auto_map": {}, "bos_token_id": 1,
        "chunk_size": 128, "conv_kernel": 4, "eos_token_id": 2, "expand": 2,
        "hidden_act": "relu2", "hidden_dropout": 0.0, "hidden_size": 32,
        "hybrid_override_pattern": "M-M*-", "initializer_range": 0.02, "intermediate_size": 64,
        "layer_norm_epsilon": 1e-05, "mamba_head_dim": 8, "mamba_hidden_act": "silu",
        "mamba_num_heads": 8, "mamba_proj_bias": False, "max_position_embeddings": 8192,
        "mlp_bias": False, "mlp_hidden_act": "relu2", "model_type": "nemotron_h",
        "n_groups": 2, "num_attention_heads": 4, "num_hidden_layers": 5,
        "num_key_value_heads": 2, "num_logits_to_keep": 1, "pad_token_id": 0,
        "rescale_prenorm_residual": True, "residual_in_fp32": False, "rms_norm_eps": 1e-05,
        "ssm_state_size": 16, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.48.0.dev0", "use_bias": False, "use_cache": True,
        "use_conv_bias": True, "use_mamba_kernels": True, "vocab_size": 256,
        "n_routed_experts": None,
    }
    config = NemotronHConfig.from_dict(hub)
    assert config.head_dim == 8 and config.layer_kinds.count("mlp") == 2
    with pytest.raises(ValueError, match="rms_norm_eps"):
        NemotronHConfig.from_dict({**hub, "rms_norm_eps": 1e-6})


def _rewrite(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    path = _rewrite(tiny_checkpoint, tmp_path / "c",
                    lambda t: t.pop("backbone.layers.0.mixer.A_log"))
    with pytest.raises(CheckpointError,
                       match=r"missing tensors: backbone\.layers\.0\.mixer\.A_log"):
        load_model(path, dtype=torch.float32)


def test_missing_expert_is_named(tiny_checkpoint, tmp_path):
    path = _rewrite(tiny_checkpoint, tmp_path / "c",
                    lambda t: t.pop("backbone.layers.2.mixer.experts.5.down_proj.weight"))
    with pytest.raises(CheckpointError,
                       match=r"backbone\.layers\.2\.mixer\.experts\.\{5\}\.down_proj\.weight"):
        load_model(path, dtype=torch.float32)


def test_unexpected_tensor_is_named(tiny_checkpoint, tmp_path):
    def add(t):
        t["backbone.layers.1.mixer.q_norm.weight"] = torch.ones(8)
    path = _rewrite(tiny_checkpoint, tmp_path / "c", add)
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*q_norm"):
        load_model(path, dtype=torch.float32)


def test_two_spellings_of_one_tensor_are_refused(tiny_checkpoint, tmp_path):
    def duplicate(t):
        t["model.embeddings.weight"] = t["backbone.embeddings.weight"].clone()
    path = _rewrite(tiny_checkpoint, tmp_path / "c", duplicate)
    with pytest.raises(CheckpointError, match="duplicate of"):
        load_model(path, dtype=torch.float32)


def test_shape_mismatch_is_named(tiny_checkpoint, tmp_path):
    def shrink(t):
        t["backbone.layers.1.mixer.k_proj.weight"] = t["backbone.layers.1.mixer.k_proj.weight"][:8]
    path = _rewrite(tiny_checkpoint, tmp_path / "c", shrink)
    with pytest.raises(CheckpointError, match=r"k_proj\.weight: shape \[8, 32\].*\[16, 32\]"):
        load_model(path, dtype=torch.float32)


def test_quantized_tensor_where_config_says_bf16(tiny_checkpoint, tmp_path):
    def quantize(t):
        w = t["backbone.layers.4.mixer.up_proj.weight"]
        t["backbone.layers.4.mixer.up_proj.weight"] = w.to(torch.float8_e4m3fn)
    path = _rewrite(tiny_checkpoint, tmp_path / "c", quantize)
    with pytest.raises(CheckpointError, match="quantization config"):
        load_model(path, dtype=torch.float32)


def test_prefixes_shards_and_stacked_experts_load(tiny_checkpoint, tiny_model, tmp_path):
    """model./language_model. prefixes, an index over two shards, experts stacked on disk."""
    dst = tmp_path / "c"
    shutil.copytree(tiny_checkpoint, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    renamed = {}
    for name, value in tensors.items():
        if ".experts." in name:
            continue
        renamed["language_model." + name.replace("backbone.", "model.", 1)] = value
    for layer in (2, 5):
        for proj in ("up", "down"):
            prefix = f"backbone.layers.{layer}.mixer.experts"
            renamed[f"model.layers.{layer}.mixer.experts.{proj}_proj"] = torch.stack(
                [tensors[f"{prefix}.{e}.{proj}_proj.weight"] for e in range(8)])
    mtp_experts = {k: v for k, v in tensors.items() if k.startswith("mtp.") and ".experts." in k}
    renamed.update(mtp_experts)
    names = sorted(renamed)
    half = len(names) // 2
    save_file({n: renamed[n] for n in names[:half]}, str(dst / "part-1.safetensors"))
    save_file({n: renamed[n] for n in names[half:]}, str(dst / "part-2.safetensors"))
    index = {"weight_map": {n: "part-1.safetensors" if i < half else "part-2.safetensors"
                            for i, n in enumerate(names)}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    model = load_model(dst, dtype=torch.float32)
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids), tiny_model(ids))


def test_mtp_weights_without_mtp_in_the_config_are_skipped(tiny_checkpoint, tiny_model, tmp_path):
    dst = tmp_path / "c"
    shutil.copytree(tiny_checkpoint, dst)
    config = json.loads((dst / "config.json").read_text())
    config["num_nextn_predict_layers"] = 0
    (dst / "config.json").write_text(json.dumps(config))
    model = load_model(dst, dtype=torch.float32)
    assert model.num_mtp_layers == 0 and model.layer_kinds == tiny_model.layer_kinds[:8]
    ids = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids), tiny_model(ids))
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        model.mtp_forward(torch.zeros(1, 32), torch.zeros(1, dtype=torch.long), None, None)


def test_prompt_longer_than_the_context(tiny_checkpoint, tiny_model):
    limit = tiny_model.config.max_position_embeddings  # 64
    with pytest.raises(ValueError, match="exceed the model's context of 64"):
        tiny_model(torch.zeros(1, limit + 1, dtype=torch.long))
    short = load_model(tiny_checkpoint, dtype=torch.float32, max_model_len=10)
    with pytest.raises(ValueError, match="context of 10"):
        short(torch.zeros(1, 11, dtype=torch.long))
    cache = short.allocate_cache(num_pages=8, page_size=4, num_slots=1)
    batch = ForwardBatch(torch.zeros(3, dtype=torch.long), torch.arange(8, 11), [3], [8],
                         torch.tensor([[0, 1, 2]], dtype=torch.int32), torch.tensor([0]))
    with pytest.raises(ValueError, match="11 tokens exceed the model's context of 10"):
        short.forward_batch(batch, cache)
    with pytest.raises(ValueError, match="max_model_len: 65"):
        load_model(tiny_checkpoint, dtype=torch.float32, max_model_len=limit + 1)


def _batch(**change):
    fields = dict(input_ids=torch.tensor([5, 6, 7]), positions=torch.tensor([0, 1, 0]),
                  seq_lens=[2, 1], cached_lens=[0, 0],
                  block_tables=torch.tensor([[0, -1], [1, -1]], dtype=torch.int32),
                  state_slots=torch.tensor([0, 1]))
    fields.update(change)
    return ForwardBatch(**fields)


@pytest.mark.parametrize("change, message", [
    ({"seq_lens": [2, 2]}, "input_ids: expected"),
    ({"cached_lens": [0]}, "cached_lens"),
    ({"positions": torch.tensor([0, 1, 1])}, "positions"),
    ({"block_tables": torch.tensor([[0, -1], [-1, -1]], dtype=torch.int32)}, "block_tables"),
    ({"state_slots": torch.tensor([1, 1])}, "same slot"),
    ({"state_slots": torch.tensor([0, 9])}, "state_slots"),
    ({"input_ids": torch.tensor([5, 6, 300])}, "token ids"),
    ({"spec_verify": True}, "spec_tokens"),
])
def test_malformed_batches_are_refused(tiny_model, change, message):
    cache = tiny_model.allocate_cache(num_pages=4, page_size=4, num_slots=2)
    with pytest.raises(ValueError, match=message):
        tiny_model.forward_batch(_batch(**change), cache)


def test_state_io_checks_its_arguments(tiny_model):
    cache = tiny_model.allocate_cache(num_pages=4, page_size=4, num_slots=2)
    row = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="not a Mamba layer"):
        cache.read_state(1, "conv", None, 0)
    with pytest.raises(ValueError, match="no page"):
        cache.read_state(1, "kv", row, None, 0, 9)
    with pytest.raises(ValueError, match="tensor: ssm state"):
        cache.write_state(0, "ssm", None, 0, 0, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="kind"):
        cache.read_state(0, "hidden", None, 0)
    with pytest.raises(ValueError, match="num_pages"):
        tiny_model.allocate_cache(num_pages=0, page_size=4, num_slots=1)


def test_expert_parallel_rank_loads_only_its_experts(tiny_checkpoint, tiny_model, monkeypatch):
    """With ep_group, the kernels' shard_experts leaves each rank a slice of every expert
    stack; the loader fills exactly that slice and skips the other ranks' experts."""
    from baton.kernels import QuantExperts
    from baton.workers.model import loader

    def keep_upper_half(model, group):
        for module in model.modules():
            if isinstance(getattr(module, "experts", None), QuantExperts):
                old = module.experts
                module.experts = QuantExperts(old.num_experts, old.in_features, old.intermediate,
                                              old.fmt, old.dtype, device="meta",
                                              expert_range=(4, 8))

    monkeypatch.setattr(loader, "_shard_experts", keep_upper_half)
    model = load_model(tiny_checkpoint, dtype=torch.float32, ep_group=object())
    for name in ("backbone.layers.2.mixer.experts", "mtp.layers.1.mixer.experts"):
        local = model.get_submodule(name)
        full = tiny_model.get_submodule(name)
        assert local.expert_range == (4, 8)
        assert torch.equal(local.up_weight, full.up_weight[4:8])
        assert torch.equal(local.down_weight, full.down_weight[4:8])


def test_large_checkpoints_report_progress(tiny_checkpoint, monkeypatch, caplog):
    from baton.workers.model import loader

    monkeypatch.setattr(loader, "PROGRESS_BYTES", 0)
    with caplog.at_level("INFO", logger=loader.__name__):
        load_model(tiny_checkpoint, dtype=torch.float32)
    marks = [r.getMessage() for r in caplog.records if "loading weights" in r.getMessage()]
    assert 5 <= len(marks) <= 10  # about every tenth of the bytes
    assert marks[-1].startswith("loading weights: shard 1/1") and "(100%)" in marks[-1]
