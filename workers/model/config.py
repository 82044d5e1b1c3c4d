"""NemotronHConfig: the architecture of a Nemotron-H / Nemotron 3 checkpoint, read from config.json.

Both spellings seen in the wild are accepted: the hub configs (`hybrid_override_pattern`,
`mtp_hybrid_override_pattern`, `mamba_*` aliases) and the one transformers writes with
save_pretrained (`layers_block_type`, `mtp_layers_block_type`). Every value that changes what
the model computes is checked; unknown fields and values that contradict each other raise a
ValueError naming the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# One character per block in a layer pattern.
PATTERN_KINDS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
# transformers' layers_block_type names for the same kinds.
BLOCK_TYPE_KINDS = {
    "linear_attention": "mamba",
    "mamba": "mamba",
    "full_attention": "attention",
    "attention": "attention",
    "mlp": "mlp",
    "moe": "moe",
}
# Older field names that mean the same as a current one.
ALIASES = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_chunk_size": "chunk_size",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_dt_limit": "time_step_limit",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_expand": "expand",
    "num_local_experts": "n_routed_experts",
    "norm_eps": "layer_norm_epsilon",
    "rms_norm_eps": "layer_norm_epsilon",
    "attention_head_dim": "head_dim",
    "hidden_act": "mlp_hidden_act",
}
# Fields that config.json carries but that change nothing at inference (training options,
# initialisation ranges, generation defaults, bookkeeping).
IGNORED_FIELDS = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "use_cache", "num_logits_to_keep", "initializer_range", "rescale_prenorm_residual",
    "attention_dropout", "hidden_dropout", "time_step_min", "time_step_max", "time_step_floor",
    "expand", "use_mamba_kernels", "output_router_logits", "moe_shared_expert_overlap",
    "residual_in_fp32", "quantization_config", "mamba_proj_bias", "_name_or_path",
    "return_dict", "output_hidden_states", "output_attentions", "tie_encoder_decoder",
    "is_encoder_decoder", "chunk_size_feed_forward", "pruned_heads", "id2label", "label2id",
    "problem_type", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "finetuning_task", "bad_words_ids", "min_length", "max_length",
    "do_sample", "num_beams", "temperature", "top_k", "top_p", "repetition_penalty",
    "tf_legacy_loss", "use_bfloat16", "torchscript", "cross_attention_hidden_size",
    "add_cross_attention", "is_decoder", "rope_theta", "rope_scaling", "partial_rotary_factor",
    "max_sequence_length", "_attn_implementation", "attn_implementation",
    "router_aux_loss_coef", "aux_loss_alpha", "use_return_dict", "output_scores",
}
# Fields accepted only with the value that changes nothing (this family never sets them).
NEUTRAL_FIELDS = {"sliding_window": None}
SSM_CACHE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class NemotronHConfig:
    """The fields of a nemotron_h config.json that decide what the model computes."""

    vocab_size: int
    """Rows of the embedding and the lm_head."""
    hidden_size: int
    """Width of the residual stream (H)."""
    layer_kinds: list[str]
    """One of mamba | attention | mlp | moe per main layer, from the layer pattern."""
    num_attention_heads: int = 32
    """Query heads of each attention layer."""
    num_key_value_heads: int = 8
    """Key/value heads (grouped-query attention); divides num_attention_heads."""
    head_dim: int = 128
    """Width of one attention head."""
    max_position_embeddings: int = 4096
    """Longest sequence (prompt + output) the model serves."""
    attention_bias: bool = False
    """Whether q/k/v/o projections carry a bias."""
    intermediate_size: int = 21504
    """Hidden width of the dense relu2 MLP layers ('-')."""
    mlp_bias: bool = False
    """Whether MLP, expert-side and latent projections carry a bias."""
    ssm_state_size: int = 128
    """Mamba2 state size per head (N)."""
    mamba_num_heads: int = 128
    """Mamba2 heads."""
    mamba_head_dim: int = 64
    """Mamba2 head width (P); intermediate = mamba_num_heads * mamba_head_dim."""
    n_groups: int = 8
    """Groups sharing B and C in Mamba2 (and the gated norm's groups)."""
    conv_kernel: int = 4
    """Width of the Mamba2 causal depthwise convolution (d_conv)."""
    chunk_size: int = 128
    """Chunk length of the Mamba2 chunked scan."""
    use_conv_bias: bool = True
    """Whether the Mamba2 convolution carries a bias."""
    use_bias: bool = False
    """Whether the Mamba2 in/out projections carry a bias."""
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    """Clamp applied to the Mamba2 time step after softplus."""
    mamba_ssm_cache_dtype: str = "float32"
    """dtype of the cached SSM state."""
    n_routed_experts: int = 8
    """Routed experts per MoE layer (E)."""
    num_experts_per_tok: int = 2
    """Experts chosen per token (top-k)."""
    moe_intermediate_size: int = 7688
    """Hidden width of one routed expert."""
    n_shared_experts: int = 1
    """Shared experts per MoE layer (0 or 1)."""
    moe_shared_expert_intermediate_size: int = 7688
    """Hidden width of the shared expert."""
    moe_latent_size: int | None = None
    """LatentMoE width: routed experts run in this width between fc1/fc2_latent_proj."""
    routed_scaling_factor: float = 1.0
    """Multiplier of the routing weights."""
    n_group: int = 1
    """Expert groups for group-limited routing."""
    topk_group: int = 1
    """Groups kept per token in group-limited routing."""
    norm_topk_prob: bool = True
    """Whether the chosen experts' weights are normalised to sum to 1."""
    num_nextn_predict_layers: int = 0
    """MTP depths (0: no multi-token prediction layers)."""
    mtp_layer_kinds: list[str] = field(default_factory=list)
    """Kinds of the MTP sublayers of one depth, from the MTP pattern."""
    tie_word_embeddings: bool = False
    """Whether the lm_head shares the embedding matrix."""
    layer_norm_epsilon: float = 1e-5
    """Epsilon of every RMSNorm."""
    mlp_hidden_act: str = "relu2"
    """Activation of MLPs and experts (only relu2 exists in this family)."""
    mamba_hidden_act: str = "silu"
    """Activation after the Mamba2 convolution (only silu)."""
    bos_token_id: int | None = 1
    """Beginning-of-sequence token."""
    eos_token_id: int | list[int] | None = 2
    """End-of-sequence token(s)."""
    pad_token_id: int | None = 0
    """Padding token."""

    # ---------------------------------------------------------------- derived sizes
    @property
    def num_hidden_layers(self) -> int:
        return len(self.layer_kinds)

    @property
    def mamba_intermediate(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        return self.mamba_intermediate + 2 * self.n_groups * self.ssm_state_size

    @property
    def ssm_cache_torch_dtype(self):
        import torch

        return getattr(torch, self.mamba_ssm_cache_dtype)

    @property
    def hybrid_override_pattern(self) -> str:
        return kinds_to_pattern(self.layer_kinds)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_file(cls, path: str | Path) -> NemotronHConfig:
        """Reads config.json (or the config.json inside a checkpoint folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> NemotronHConfig:
        """Builds and validates a config from a config.json dictionary."""
        if not isinstance(raw, dict):
            raise ValueError(f"config must be a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type", "nemotron_h")
        if model_type != "nemotron_h":
            raise ValueError(f"model_type: expected 'nemotron_h', got {model_type!r}")
        values: dict[str, Any] = {}
        for key, value in raw.items():
            name = ALIASES.get(key, key)
            if name in values and values[name] != value:
                raise ValueError(f"{key}: {value!r} contradicts {name}={values[name]!r}")
            values[name] = value
        known = {f.name for f in fields(cls)} - {"layer_kinds", "mtp_layer_kinds"}
        pattern_fields = {
            "hybrid_override_pattern", "layers_block_type", "layer_types", "num_hidden_layers",
            "mtp_hybrid_override_pattern", "mtp_layers_block_type",
        }
        for key, neutral in NEUTRAL_FIELDS.items():
            if values.get(key, neutral) != neutral:
                raise ValueError(f"{key}: only {neutral!r} is supported, got {values[key]!r}")
        for key in values:
            if key in NEUTRAL_FIELDS:
                continue
            if key not in known and key not in IGNORED_FIELDS and key not in pattern_fields:
                raise ValueError(
                    f"{key}: unknown config field for nemotron_h (value {values[key]!r})"
                )

        layer_kinds = _main_layer_kinds(values)
        mtp_kinds = _mtp_layer_kinds(values)
        # null means "the default" (e.g. n_routed_experts: null in dense checkpoints), except
        # for the fields whose default is null.
        nullable = {f.name for f in fields(cls) if f.default is None}
        kwargs = {k: _decode_json_float(v) for k, v in values.items()
                  if k in known and (v is not None or k in nullable)}
        if "time_step_limit" in kwargs:
            kwargs["time_step_limit"] = _time_step_limit(kwargs["time_step_limit"])
        if kwargs.get("head_dim") is None and "num_attention_heads" in kwargs:
            kwargs["head_dim"] = int(values["hidden_size"]) // int(kwargs["num_attention_heads"])
        if kwargs.get("num_key_value_heads") is None and "num_attention_heads" in kwargs:
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        for required in ("vocab_size", "hidden_size"):
            if required not in kwargs:
                raise ValueError(f"{required}: missing from config.json")
        config = cls(layer_kinds=layer_kinds, mtp_layer_kinds=mtp_kinds, **kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        """Raises ValueError naming the first field that is out of range or contradicts another."""
        positive = [
            "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "max_position_embeddings", "ssm_state_size", "mamba_num_heads", "mamba_head_dim",
            "n_groups", "conv_kernel", "chunk_size", "n_routed_experts", "num_experts_per_tok",
            "n_group", "topk_group",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if not self.layer_kinds:
            raise ValueError("hybrid_override_pattern: the model needs at least one layer")
        kinds = set(self.layer_kinds)
        if "attention" in kinds and self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads: {self.num_key_value_heads} does not divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if "mamba" in kinds:
            if self.mamba_num_heads % self.n_groups:
                raise ValueError(
                    f"n_groups: {self.n_groups} does not divide mamba_num_heads="
                    f"{self.mamba_num_heads}"
                )
            if self.conv_kernel < 2:
                raise ValueError(f"conv_kernel: must be at least 2, got {self.conv_kernel}")
        if "mlp" in kinds and self.intermediate_size <= 0:
            raise ValueError(f"intermediate_size: must be positive, got {self.intermediate_size}")
        has_moe = "moe" in kinds or "moe" in self.mtp_layer_kinds
        if has_moe:
            if self.moe_intermediate_size <= 0:
                raise ValueError(
                    f"moe_intermediate_size: must be positive, got {self.moe_intermediate_size}"
                )
            if self.num_experts_per_tok > self.n_routed_experts:
                raise ValueError(
                    f"num_experts_per_tok: {self.num_experts_per_tok} exceeds "
                    f"n_routed_experts={self.n_routed_experts}"
                )
            if self.n_routed_experts % self.n_group:
                raise ValueError(
                    f"n_group: {self.n_group} does not divide n_routed_experts="
                    f"{self.n_routed_experts}"
                )
            if self.topk_group > self.n_group:
                raise ValueError(f"topk_group: {self.topk_group} exceeds n_group={self.n_group}")
            if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
                raise ValueError(
                    f"n_group: {self.n_group} groups leave fewer than 2 experts per group "
                    "(group scores sum each group's top-2)"
                )
            allowed = self.topk_group * (self.n_routed_experts // self.n_group)
            if self.num_experts_per_tok > allowed:
                raise ValueError(
                    f"num_experts_per_tok: {self.num_experts_per_tok} exceeds the {allowed} "
                    f"experts that topk_group={self.topk_group} groups hold"
                )
            if self.n_shared_experts not in (0, 1):
                raise ValueError(
                    f"n_shared_experts: only 0 or 1 is supported, got {self.n_shared_experts}"
                )
            if self.n_shared_experts and self.moe_shared_expert_intermediate_size <= 0:
                raise ValueError(
                    "moe_shared_expert_intermediate_size: must be positive, got "
                    f"{self.moe_shared_expert_intermediate_size}"
                )
            if self.moe_latent_size is not None and self.moe_latent_size <= 0:
                raise ValueError(f"moe_latent_size: must be positive, got {self.moe_latent_size}")
        if self.mlp_hidden_act != "relu2":
            raise ValueError(
                f"mlp_hidden_act: only 'relu2' is supported, got {self.mlp_hidden_act!r}")
        if self.mamba_hidden_act != "silu":
            raise ValueError(
                f"mamba_hidden_act: only 'silu' is supported, got {self.mamba_hidden_act!r}"
            )
        if self.mamba_ssm_cache_dtype not in SSM_CACHE_DTYPES:
            raise ValueError(
                f"mamba_ssm_cache_dtype: {self.mamba_ssm_cache_dtype!r} is not one of "
                f"{SSM_CACHE_DTYPES}"
            )
        low, high = self.time_step_limit
        if not low < high or low < 0:
            raise ValueError(f"time_step_limit: need 0 <= low < high, got {self.time_step_limit}")
        if self.layer_norm_epsilon <= 0:
            raise ValueError(f"layer_norm_epsilon: must be positive, got {self.layer_norm_epsilon}")
        if self.num_nextn_predict_layers < 0:
            raise ValueError(
                f"num_nextn_predict_layers: must be >= 0, got {self.num_nextn_predict_layers}"
            )
        if self.num_nextn_predict_layers > 1:
            raise ValueError(
                f"num_nextn_predict_layers: only one MTP depth is supported (drafts chain "
                f"through it), got {self.num_nextn_predict_layers}"
            )
        if self.num_nextn_predict_layers and not self.mtp_layer_kinds:
            raise ValueError(
                "mtp_hybrid_override_pattern: empty while num_nextn_predict_layers > 0")
        if "mamba" in self.mtp_layer_kinds:
            raise ValueError(
                f"mtp_hybrid_override_pattern: Mamba ('M') MTP sublayers are not supported, got "
                f"{kinds_to_pattern(self.mtp_layer_kinds)!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as a config.json dictionary (hub spelling)."""
        out: dict[str, Any] = {"model_type": "nemotron_h",
                               "architectures": ["NemotronHForCausalLM"]}
        for f in fields(self):
            if f.name in ("layer_kinds", "mtp_layer_kinds"):
                continue
            value = getattr(self, f.name)
            if f.name == "time_step_limit":
                value = [value[0], value[1] if math.isfinite(value[1]) else 1e30]
            out[f.name] = value
        out["hybrid_override_pattern"] = kinds_to_pattern(self.layer_kinds)
        out["num_hidden_layers"] = len(self.layer_kinds)
        if self.num_nextn_predict_layers:
            out["mtp_hybrid_override_pattern"] = kinds_to_pattern(self.mtp_layer_kinds)
        return out


def pattern_to_kinds(pattern: str, field_name: str = "hybrid_override_pattern") -> list[str]:
    """'M*E-' -> ['mamba', 'attention', 'moe', 'mlp']; ValueError naming a bad character."""
    if not isinstance(pattern, str):
        raise ValueError(f"{field_name}: must be a string, got {pattern!r}")
    kinds = []
    for index, char in enumerate(pattern):
        if char not in PATTERN_KINDS:
            raise ValueError(
                f"{field_name}: unknown layer character {char!r} at position {index} of "
                f"{pattern!r}; allowed: M (Mamba2), * (attention), - (MLP), E (MoE)"
            )
        kinds.append(PATTERN_KINDS[char])
    return kinds


def kinds_to_pattern(kinds: list[str]) -> str:
    reverse = {kind: char for char, kind in PATTERN_KINDS.items()}
    return "".join(reverse[k] for k in kinds)


def _block_types_to_kinds(types: Any, field_name: str) -> list[str]:
    if not isinstance(types, list):
        raise ValueError(f"{field_name}: must be a list of layer types, got {types!r}")
    kinds = []
    for index, name in enumerate(types):
        if name not in BLOCK_TYPE_KINDS:
            raise ValueError(
                f"{field_name}: unknown layer type {name!r} at index {index}; allowed: "
                f"{sorted(BLOCK_TYPE_KINDS)}"
            )
        kinds.append(BLOCK_TYPE_KINDS[name])
    return kinds


def _main_layer_kinds(values: dict[str, Any]) -> list[str]:
    from_pattern = None
    if values.get("hybrid_override_pattern") is not None:
        from_pattern = pattern_to_kinds(values["hybrid_override_pattern"])
    from_list = None
    for key in ("layers_block_type", "layer_types"):
        if values.get(key) is not None:
            from_list = _block_types_to_kinds(values[key], key)
    if from_pattern is not None and from_list is not None and from_pattern != from_list:
        raise ValueError(
            f"layers_block_type: {values.get('layers_block_type')} contradicts "
            f"hybrid_override_pattern={values['hybrid_override_pattern']!r}"
        )
    kinds = from_pattern if from_pattern is not None else from_list
    if kinds is None:
        raise ValueError("hybrid_override_pattern: missing (or layers_block_type)")
    declared = values.get("num_hidden_layers")
    if declared is not None and declared != len(kinds):
        raise ValueError(
            f"num_hidden_layers: {declared} contradicts the layer pattern's {len(kinds)} layers"
        )
    return kinds


def _mtp_layer_kinds(values: dict[str, Any]) -> list[str]:
    if not values.get("num_nextn_predict_layers"):
        return []
    if values.get("mtp_hybrid_override_pattern") is not None:
        return pattern_to_kinds(values["mtp_hybrid_override_pattern"],
                                "mtp_hybrid_override_pattern")
    if values.get("mtp_layers_block_type") is not None:
        return _block_types_to_kinds(values["mtp_layers_block_type"], "mtp_layers_block_type")
    # transformers' default MTP pattern for this family.
    return ["attention", "moe"]


def _decode_json_float(value: Any) -> Any:
    # transformers writes non-finite floats as {"__float__": "Infinity"}.
    if isinstance(value, dict) and set(value) == {"__float__"}:
        return float(value["__float__"])
    if isinstance(value, list):
        return [_decode_json_float(v) for v in value]
    return value


def _time_step_limit(value: Any) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"time_step_limit: expected [low, high], got {value!r}")
    low, high = (float(v) for v in value)
    # Hub configs spell "no upper limit" as a huge number.
    if high >= 1e30:
        high = math.inf
    return (low, high)
