"""The Nemotron-H / Nemotron 3 causal LM: embedding, a hybrid stack of pre-norm blocks built
from the layer pattern, norm_f, lm_head, and the multi-token-prediction (MTP) sublayers.

Shapes: `[B, T, H]`  B sequences, T tokens, H hidden, V vocab; the cache-aware path works on
`[T, H]`, the tokens of all sequences of a step concatenated (ForwardBatch).

Module names follow the checkpoint: `backbone.embeddings`, `backbone.layers.{i}.norm`,
`backbone.layers.{i}.mixer.*`, `backbone.norm_f`, `lm_head`, `mtp.layers.{j}.*`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from baton.kernels import QuantLinear, set_backend
from baton.kernels.attention_decode import split_tokens_for
from baton.kernels.formats import BACKEND_CHOICES, check_backend

from .batch import BatchPlan, ForwardBatch, KernelPlan
from .cache import ModelCache
from .config import NemotronHConfig
from .layers import MLP, Attention, FormatPlan, MoE, RMSNorm, as_dtype, as_f32, on_device
from .mamba import Mamba2Mixer


def make_mixer(kind: str, config: NemotronHConfig, name: str, formats: FormatPlan,
               dtype: torch.dtype) -> nn.Module:
    """The block factory: one mixer per layer-pattern character."""
    if kind == "mamba":
        return Mamba2Mixer(config, name, formats, dtype)
    if kind == "attention":
        return Attention(config, name, formats, dtype)
    if kind == "mlp":
        return MLP(config.hidden_size, config.intermediate_size, name, formats, dtype,
                   config.mlp_bias)
    if kind == "moe":
        return MoE(config, name, formats, dtype)
    raise ValueError(f"layer kind: {kind!r} is not one of mamba, attention, mlp, moe")


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x))."""

    def __init__(self, kind: str, config: NemotronHConfig, name: str, formats: FormatPlan,
                 dtype: torch.dtype):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon, dtype)
        self.mixer = make_mixer(kind, config, f"{name}.mixer", formats, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x))

    def forward_cached(self, x: torch.Tensor, plan: BatchPlan | KernelPlan, cache: ModelCache,
                       layer: int) -> torch.Tensor:
        return x + self.mixer.forward_cached(self.norm(x), plan, cache, layer)


class MTPSublayer(Block):
    """One sublayer of the MTP depth. The first also fuses the next token's embedding with the
    main model's hidden state (eh_proj over [enorm(embed), hnorm(hidden)]); the last ends in
    final_layernorm."""

    def __init__(self, kind: str, config: NemotronHConfig, name: str, formats: FormatPlan,
                 dtype: torch.dtype, first: bool, last: bool):
        super().__init__(kind, config, name, formats, dtype)
        h, eps = config.hidden_size, config.layer_norm_epsilon
        if first:
            self.enorm = RMSNorm(h, eps, dtype)
            self.hnorm = RMSNorm(h, eps, dtype)
            self.eh_proj = QuantLinear(2 * h, h, formats.format_for(f"{name}.eh_proj")[0], dtype)
        if last:
            self.final_layernorm = RMSNorm(h, eps, dtype)


class Backbone(nn.Module):
    def __init__(self, config: NemotronHConfig, formats: FormatPlan, dtype: torch.dtype):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(
            Block(kind, config, f"backbone.layers.{i}", formats, dtype)
            for i, kind in enumerate(config.layer_kinds))
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon, dtype)


class MTP(nn.Module):
    def __init__(self, config: NemotronHConfig, formats: FormatPlan, dtype: torch.dtype):
        super().__init__()
        kinds = config.mtp_layer_kinds
        self.layers = nn.ModuleList(
            MTPSublayer(kind, config, f"mtp.layers.{j}", formats, dtype, first=j == 0,
                        last=j == len(kinds) - 1)
            for j, kind in enumerate(kinds))


class NemotronHModel(nn.Module):
    """The causal LM. Use load_model() to build one from a checkpoint."""

    def __init__(self, config: NemotronHConfig, dtype: torch.dtype = torch.bfloat16,
                 formats: FormatPlan | None = None, max_model_len: int | None = None):
        super().__init__()
        formats = formats or FormatPlan()
        self.config = config
        self.dtype = dtype
        if max_model_len is None:
            max_model_len = config.max_position_embeddings
        if not isinstance(max_model_len, int) or max_model_len < 1:
            raise ValueError(f"max_model_len: must be a positive integer, got {max_model_len!r}")
        self.max_model_len = max_model_len
        # paged_attention's split size, fixed once from the longest context (never per batch).
        self.split_tokens = split_tokens_for(max_model_len)
        self.kernels = "torch"
        self.backbone = Backbone(config, formats, dtype)
        lm_fmt = formats.format_for("lm_head")[0]
        self.lm_head = QuantLinear(config.hidden_size, config.vocab_size, lm_fmt, dtype)
        self.mtp = MTP(config, formats, dtype) if config.num_nextn_predict_layers else None

    # ------------------------------------------------------------------ structure
    @property
    def layer_kinds(self) -> list[str]:
        """mamba | attention | mlp | moe per main layer, then per MTP sublayer (index L + j)."""
        return list(self.config.layer_kinds) + list(self.config.mtp_layer_kinds
                                                    if self.mtp is not None else [])

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_mtp_layers(self) -> int:
        """MTP sublayers (0 without MTP); their cache layers are L + j."""
        return len(self.mtp.layers) if self.mtp is not None else 0

    @property
    def device(self) -> torch.device:
        return self.backbone.norm_f.weight.device

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids: must be an integer tensor, got {input_ids.dtype}")
        if not input_ids.numel():
            return
        low, high = (int(v) for v in torch.stack(torch.aminmax(input_ids)).tolist())  # one sync
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(
                f"input_ids: token ids must be in [0, {self.config.vocab_size}), got "
                f"{low}..{high}")

    # ------------------------------------------------------------------ full forward
    # The full-sequence path is differentiable (training runs through it: tools/train_demo.py);
    # a loaded model has requires_grad off, so inference builds no graph here.
    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> hidden after norm_f [B, T, H], from empty state, no cache."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected [B, T], got {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.max_model_len:
            raise ValueError(
                f"input_ids: {input_ids.shape[1]} tokens exceed the model's context of "
                f"{self.max_model_len} tokens (max_model_len)")
        self._check_ids(input_ids)
        x = self.backbone.embeddings(input_ids.to(self.device))
        for block in self.backbone.layers:
            x = block(x)
        return self.backbone.norm_f(x)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] LongTensor -> logits [B, T, V] float32 (full forward, no cache)."""
        return self.compute_logits(self.hidden_states(input_ids))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] (after norm_f or MTP final_layernorm) -> logits [..., V] float32."""
        return as_f32(self.lm_head(as_dtype(hidden, self.dtype)))

    def mtp_forward_full(self, prev_hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """The MTP depth over whole sequences, no cache: prev_hidden [B, T, H] (main hidden at
        positions 0..T-1, or this depth's own output for the next draft), next_ids [B, T]
        (tokens at 1..T) -> [B, T, H] for compute_logits (predicting tokens 2..T+1)."""
        self._require_mtp()
        x = self._mtp_input(prev_hidden, next_ids)
        for sublayer in self.mtp.layers:
            x = sublayer(x)
        return self.mtp.layers[-1].final_layernorm(x)

    # ------------------------------------------------------------------ cache-aware forward
    def allocate_cache(self, num_pages: int, page_size: int, num_slots: int,
                       spec_tokens: int = 0, ssm_dtype: torch.dtype | None = None) -> ModelCache:
        """KV pages for every attention layer (MTP included) and Mamba state slots."""
        blocks = [*self.backbone.layers, *(self.mtp.layers if self.mtp is not None else [])]
        layers = {index: block.mixer.cache_spec() for index, block in enumerate(blocks)
                  if hasattr(block.mixer, "cache_spec")}
        return ModelCache(
            layers, self.config.num_hidden_layers, num_pages=num_pages, page_size=page_size,
            num_slots=num_slots, spec_tokens=spec_tokens, dtype=self.dtype,
            ssm_dtype=ssm_dtype or self.config.ssm_cache_torch_dtype, device=self.device)

    def set_kernels(self, kernels: str = "auto") -> None:
        """Chooses the cached path's kernels once (load_model does): "torch", the reference
        everywhere; "triton", the Mamba2 and paged-attention kernels of baton.kernels (and the
        quantized modules' kernels); "auto", triton on a CUDA device, torch elsewhere."""
        check_backend(kernels, field="kernels", choices=BACKEND_CHOICES)
        set_backend(self, kernels)
        if kernels == "auto":
            kernels = "triton" if self.device.type == "cuda" else "torch"
        self.kernels = kernels

    def plan(self, batch: ForwardBatch, cache: ModelCache) -> BatchPlan | KernelPlan:
        """The step's checked indices (on the host, before anything is launched) in the form
        the chosen kernels read."""
        limits = dict(page_size=cache.page_size, num_pages=cache.num_pages,
                      num_slots=cache.num_slots, max_len=self.max_model_len,
                      spec_tokens=cache.spec_tokens, device=self.device,
                      vocab_size=self.config.vocab_size)
        if self.kernels == "triton":
            return KernelPlan.build(batch, chunk_size=self.config.chunk_size,
                                    split_tokens=self.split_tokens, **limits)
        return BatchPlan(batch, **limits)

    @torch.inference_mode()
    def forward_batch(self, batch: ForwardBatch, cache: ModelCache,
                      on_layer_done: Callable[[int], None] | None = None) -> torch.Tensor:
        """One engine step -> hidden after norm_f [T, H]. Writes the new tokens' K/V into their
        pages and each sequence's Mamba state back to its slot (or, with spec_verify, into the
        per-token snapshots that cache.accept chooses from). on_layer_done(i) runs as soon as
        main layer i has finished for the whole batch."""
        plan = self.plan(batch, cache)
        self.mark_pending(plan, cache)
        return self.forward_planned(on_device(batch.input_ids, self.device), plan, cache,
                                    on_layer_done)

    @staticmethod
    def mark_pending(plan: BatchPlan | KernelPlan, cache: ModelCache) -> None:
        """The cache's host bookkeeping of a step: a verification leaves each slot's 1 + K
        snapshots to accept; a plain step moves the slots on, so earlier snapshots are
        stale."""
        verified = plan.seq_lens if plan.spec_verify else [0] * len(plan.slots)
        cache.mark_pending(plan.slots, verified)

    def forward_planned(self, input_ids: torch.Tensor, plan: BatchPlan | KernelPlan,
                        cache: ModelCache,
                        on_layer_done: Callable[[int], None] | None = None) -> torch.Tensor:
        """The device part of a step: input_ids [T] on the model's device, the plan made by
        plan() -> hidden after norm_f [T, H]. With a KernelPlan nothing here reads back to
        the host (a CUDA graph captures it)."""
        x = self.backbone.embeddings(input_ids)
        for index, block in enumerate(self.backbone.layers):
            x = block.forward_cached(x, plan, cache, index)
            if on_layer_done is not None:
                on_layer_done(index)
        return self.backbone.norm_f(x)

    @torch.inference_mode()
    def mtp_forward(self, prev_hidden: torch.Tensor, next_ids: torch.Tensor,
                    batch: ForwardBatch, cache: ModelCache) -> torch.Tensor:
        """One MTP depth: prev_hidden [n, H] (main hidden after norm_f at position i, or the
        previous draft's MTP output), next_ids [n] (token at i + 1) -> hidden [n, H] for
        compute_logits. Positions, pages and slots come from `batch`; the MTP attention
        sublayers keep their K/V in the cache's layers L + j."""
        self._require_mtp()
        plan = self.plan(batch, cache)
        n = sum(plan.seq_lens)
        if prev_hidden.shape != (n, self.config.hidden_size) or next_ids.shape != (n,):
            raise ValueError(
                f"prev_hidden/next_ids: expected [{n}, {self.config.hidden_size}] and [{n}] "
                f"for a batch of {n} tokens, got {tuple(prev_hidden.shape)} and "
                f"{tuple(next_ids.shape)}")
        if next_ids is not batch.input_ids:
            self._check_ids(next_ids)
        return self.mtp_planned(on_device(prev_hidden, self.device),
                                on_device(next_ids, self.device), plan, cache)

    def mtp_planned(self, prev_hidden: torch.Tensor, next_ids: torch.Tensor,
                    plan: BatchPlan | KernelPlan, cache: ModelCache) -> torch.Tensor:
        """mtp_forward's device part (prev_hidden and next_ids on the model's device)."""
        x = self._mtp_input(prev_hidden, next_ids)
        base = self.config.num_hidden_layers
        for j, sublayer in enumerate(self.mtp.layers):
            x = sublayer.forward_cached(x, plan, cache, base + j)
        return self.mtp.layers[-1].final_layernorm(x)

    def _mtp_input(self, prev_hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        first = self.mtp.layers[0]
        embedded = first.enorm(self.backbone.embeddings(on_device(next_ids, self.device)))
        hidden = first.hnorm(as_dtype(on_device(prev_hidden, self.device), self.dtype))
        return first.eh_proj(torch.cat([embedded, hidden], dim=-1))

    def _require_mtp(self) -> None:
        if self.mtp is None:
            raise ValueError(
                "num_nextn_predict_layers: this model has no MTP layers (config value 0)")
