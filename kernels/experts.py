"""QuantExperts: a stack of MoE experts, down(relu(up(x))**2), in any WeightFormat.

Shapes: `[T, K]`  T tokens, K in_features (the latent width in a LatentMoE), I intermediate,
E experts held (the local ones under expert parallelism), k top-k, P (token, expert) pairs.

Tensors by format (the per-expert checkpoint names with `up_`/`down_` prefixes, stacked):
    bf16         up_weight [E, I, K], down_weight [E, K, I] (model dtype)
    fp8          up_weight e4m3 [E, I, K], up_weight_scale fp32 [E] (or [E, I] per channel),
                 up_input_scale fp32 [E] (per-tensor only); down_* likewise with [E, K, I]
    nvfp4        up_weight uint8 [E, I, K/2], up_weight_scale e4m3 [E, I, K/16],
                 up_weight_scale_2 fp32 [E], up_input_scale fp32 [E]; down_* likewise
    w4a16_nvfp4  as nvfp4 without the input scales

The output for token t is sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x_t). Every
(token, slot) contribution is computed in fp32 (the intermediate relu2 activation rounded to
x.dtype, as the fused kernel keeps it) and the slots are added in slot order 0..k-1, so the
result does not depend on which process computed which contribution (expert parallelism
relies on this). How the stack computes is chosen once, by set_backend: ReferenceExperts
(the "torch" backend, per expert in fp32 on dequantized weights) or TritonExperts
("triton": moe_decode, no sort and two launches, when a batch has about one pair per expert
or fewer; fused_moe, pairs sorted into expert blocks and grouped GEMMs, otherwise). The
kernels read the weight format as a compile-time constant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from baton.kernels import fp8, fused_moe, moe_decode, nvfp4
from baton.kernels.formats import WeightFormat, check_backend, check_model_dtype


class QuantExperts(nn.Module):
    """Experts [first, last) of a `num_experts` MoE layer; tokens routed elsewhere add 0."""

    def __init__(self, num_experts: int, in_features: int, intermediate: int,
                 fmt: WeightFormat | str = WeightFormat.BF16, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None, fp8_per_channel: bool = False,
                 expert_range: tuple[int, int] | None = None):
        super().__init__()
        self.fmt = WeightFormat.parse(fmt)
        self.dtype = check_model_dtype(dtype)
        for field, value in (("num_experts", num_experts), ("in_features", in_features),
                             ("intermediate", intermediate)):
            if value < 1:
                raise ValueError(f"{field}={value} must be >= 1")
        if self.fmt.is_nvfp4:
            for field, value in (("in_features", in_features), ("intermediate", intermediate)):
                if value % nvfp4.BLOCK_SIZE != 0:
                    raise ValueError(
                        f"{field}={value} must be a multiple of {nvfp4.BLOCK_SIZE} for "
                        f"{self.fmt.value}"
                    )
        if fp8_per_channel and self.fmt is not WeightFormat.FP8:
            raise ValueError(f"fp8_per_channel=True needs fmt='fp8', got fmt={self.fmt.value!r}")
        first, last = (0, num_experts) if expert_range is None else expert_range
        if not 0 <= first < last <= num_experts:
            raise ValueError(
                f"expert_range={expert_range} must satisfy 0 <= first < last <= "
                f"num_experts={num_experts}"
            )
        self.num_experts = num_experts
        self.expert_range = (first, last)
        self.in_features, self.intermediate = in_features, intermediate
        self.fp8_per_channel = fp8_per_channel
        self.set_backend("torch")
        e = last - first
        for prefix, (n, k) in (("up", (intermediate, in_features)),
                               ("down", (in_features, intermediate))):
            self._make_tensors(prefix, e, n, k, device)

    def _make_tensors(self, prefix: str, e: int, n: int, k: int, device) -> None:
        f32 = dict(dtype=torch.float32, device=device)

        def frozen(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t, requires_grad=False)

        if self.fmt is WeightFormat.BF16:
            setattr(self, f"{prefix}_weight", frozen(torch.zeros(e, n, k, dtype=self.dtype,
                                                                 device=device)))
        elif self.fmt is WeightFormat.FP8:
            setattr(self, f"{prefix}_weight",
                    frozen(torch.zeros(e, n, k, dtype=torch.float8_e4m3fn, device=device)))
            scale_shape = (e, n) if self.fp8_per_channel else (e,)
            self.register_buffer(f"{prefix}_weight_scale", torch.ones(scale_shape, **f32))
            if not self.fp8_per_channel:
                self.register_buffer(f"{prefix}_input_scale", torch.ones(e, **f32))
        else:
            setattr(self, f"{prefix}_weight",
                    frozen(torch.zeros(e, n, k // 2, dtype=torch.uint8, device=device)))
            self.register_buffer(
                f"{prefix}_weight_scale",
                torch.ones(e, n, k // nvfp4.BLOCK_SIZE, **f32).to(torch.float8_e4m3fn),
            )
            self.register_buffer(f"{prefix}_weight_scale_2", torch.ones(e, **f32))
            if self.fmt is WeightFormat.NVFP4:
                self.register_buffer(f"{prefix}_input_scale", torch.ones(e, **f32))

    @property
    def num_local_experts(self) -> int:
        return self.expert_range[1] - self.expert_range[0]

    @classmethod
    def from_float(cls, up: torch.Tensor, down: torch.Tensor,
                   fmt: WeightFormat | str = WeightFormat.BF16,
                   dtype: torch.dtype = torch.bfloat16, fp8_per_channel: bool = False,
                   expert_range: tuple[int, int] | None = None,
                   num_experts: int | None = None) -> QuantExperts:
        """Quantizes up [E, I, K] and down [E, K, I] (each expert on its own scales).

        With expert_range, `up`/`down` hold only those experts of a `num_experts` layer.
        """
        if up.dim() != 3 or down.dim() != 3 or up.shape[0] != down.shape[0] or (
            tuple(down.shape[1:]) != (up.shape[2], up.shape[1])
        ):
            raise ValueError(
                f"up must be [E, I, K] and down [E, K, I]; got up {tuple(up.shape)}, "
                f"down {tuple(down.shape)}"
            )
        e, i, k = up.shape
        total = num_experts if num_experts is not None else (
            e if expert_range is None else expert_range[1])
        module = cls(total, k, i, fmt, dtype, device=up.device, fp8_per_channel=fp8_per_channel,
                     expert_range=expert_range)
        if module.num_local_experts != e:
            raise ValueError(
                f"expert_range={module.expert_range} holds {module.num_local_experts} experts, "
                f"up/down hold {e}"
            )
        with torch.no_grad():
            for prefix, w in (("up", up), ("down", down)):
                module.load_float(prefix, w)
        return module

    def load_float(self, prefix: str, w: torch.Tensor) -> None:
        """Quantizes float weights [E, N, K] into the `prefix` ("up" or "down") tensors."""
        if self.fmt is WeightFormat.BF16:
            getattr(self, f"{prefix}_weight").copy_(w.to(self.dtype))
        elif self.fmt is WeightFormat.FP8:
            q, scale = fp8.quantize_fp8(w, per_channel=self.fp8_per_channel)
            getattr(self, f"{prefix}_weight").copy_(q)
            getattr(self, f"{prefix}_weight_scale").copy_(scale)
        else:
            packed, block_scale, global_scale = nvfp4.quantize(w)
            getattr(self, f"{prefix}_weight").copy_(packed)
            getattr(self, f"{prefix}_weight_scale").copy_(block_scale)
            getattr(self, f"{prefix}_weight_scale_2").copy_(global_scale)

    def dequantized_weight(self, prefix: str, local_expert: int,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One local expert's `prefix` weight [N, K] in `dtype`, as the reference sees it."""
        w = getattr(self, f"{prefix}_weight")[local_expert]
        if self.fmt is WeightFormat.BF16:
            return w.to(dtype)
        if self.fmt is WeightFormat.FP8:
            return fp8.dequantize_fp8(w, getattr(self, f"{prefix}_weight_scale")[local_expert],
                                      dtype)
        return nvfp4.dequantize_ref(w, getattr(self, f"{prefix}_weight_scale")[local_expert],
                                    getattr(self, f"{prefix}_weight_scale_2")[local_expert],
                                    dtype)

    def _check_routing(self, x: torch.Tensor, topk_ids: torch.Tensor,
                       topk_weights: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"x must be [T, {self.in_features}] (in_features), got {tuple(x.shape)}"
            )
        if topk_ids.dtype != torch.int64 or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
            raise ValueError(
                f"topk_ids must be int64 [T={x.shape[0]}, k], got {topk_ids.dtype} "
                f"{tuple(topk_ids.shape)}"
            )
        if topk_weights.dtype != torch.float32 or topk_weights.shape != topk_ids.shape:
            raise ValueError(
                f"topk_weights must be float32 {tuple(topk_ids.shape)} like topk_ids, got "
                f"{topk_weights.dtype} {tuple(topk_weights.shape)}"
            )

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, K], topk_ids [T, k] int64, topk_weights [T, k] fp32 -> [T, K] in x.dtype.

        Ids must lie in [0, num_experts) (route() gives such): the torch backend raises
        ValueError otherwise; the Triton kernels do not check (that would wait on the GPU).
        """
        self._check_routing(x, topk_ids, topk_weights)
        return self.compute.forward(self, x, topk_ids, topk_weights)

    def expert_outputs(self, x: torch.Tensor, token_ids: torch.Tensor, expert_ids: torch.Tensor,
                       weights: torch.Tensor) -> torch.Tensor:
        """Weighted contributions of (token, expert) pairs -> [P, K] float32.

        Pair p is weights[p] * expert_{expert_ids[p]}(x[token_ids[p]]); expert ids are global,
        and a pair whose expert is not held here contributes 0. Each pair's row depends only
        on its own token and expert, whichever other pairs come with it (for the torch
        backend bit for bit; the Triton kernels pick tiles by batch size).
        """
        return self.compute.expert_outputs(self, x, token_ids, expert_ids, weights)

    def _expert_outputs_ref(self, x: torch.Tensor, token_ids: torch.Tensor,
                            expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        first, last = self.expert_range
        out = torch.zeros(expert_ids.shape[0], self.in_features, dtype=torch.float32,
                          device=x.device)
        if expert_ids.numel() and not (0 <= int(expert_ids.min())
                                       and int(expert_ids.max()) < self.num_experts):
            raise ValueError(
                f"expert ids span [{int(expert_ids.min())}, {int(expert_ids.max())}]; allowed: "
                f"[0, num_experts={self.num_experts})"
            )
        local = (expert_ids >= first) & (expert_ids < last)
        pair_ids = torch.nonzero(local).squeeze(1)
        if pair_ids.numel() == 0:
            return out
        # Pairs grouped by expert, in their original order within each expert.
        order = torch.argsort(expert_ids[pair_ids], stable=True)
        pair_ids = pair_ids[order]
        counts = torch.bincount(expert_ids[pair_ids] - first, minlength=last - first).tolist()
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            rows = pair_ids[start:start + count]
            start += count
            xs = x[token_ids[rows]].float()
            h = F.linear(xs, self.dequantized_weight("up", e))
            h = torch.relu(h).square().to(x.dtype).float()
            y = F.linear(h, self.dequantized_weight("down", e))
            out[rows] = y * weights[rows].unsqueeze(1)
        return out

    def set_backend(self, backend: str) -> None:
        """Chooses how the stack computes, once: "torch" (ReferenceExperts) or "triton"
        (TritonExperts)."""
        self.backend = check_backend(backend)
        self.compute = TritonExperts if backend == "triton" else ReferenceExperts

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, expert_range={self.expert_range}, "
                f"in_features={self.in_features}, intermediate={self.intermediate}, "
                f"fmt={self.fmt.value}, backend={self.backend}")


def combine_slots(slots: torch.Tensor) -> torch.Tensor:
    """[T, k, K] fp32 contributions -> [T, K] fp32, added in slot order 0..k-1.

    A fixed order makes the sum the same bits wherever the contributions were computed.
    """
    out = slots[:, 0].clone()
    for j in range(1, slots.shape[1]):
        out += slots[:, j]
    return out


class ReferenceExperts:
    """The torch reference: each expert's pairs through its dequantized weights, in fp32."""

    @staticmethod
    def forward(module: QuantExperts, x: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        t, k = topk_ids.shape
        token_ids = torch.arange(t, device=x.device).repeat_interleave(k)
        slots = module.expert_outputs(x, token_ids, topk_ids.reshape(-1),
                                      topk_weights.reshape(-1))
        return combine_slots(slots.view(t, k, module.in_features)).to(x.dtype)

    @staticmethod
    def expert_outputs(module: QuantExperts, x: torch.Tensor, token_ids: torch.Tensor,
                       expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return module._expert_outputs_ref(x, token_ids, expert_ids, weights)


class TritonExperts:
    """The Triton kernels: moe_decode for about one pair per expert or fewer, else
    fused_moe (the choice follows the batch's shape, never its values)."""

    @staticmethod
    def forward(module: QuantExperts, x: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        if moe_decode.use_decode_path(topk_ids.numel(), module.num_local_experts):
            return moe_decode.moe_decode(module, x, topk_ids, topk_weights)
        return fused_moe.moe_forward(module, x, topk_ids, topk_weights)

    @staticmethod
    def expert_outputs(module: QuantExperts, x: torch.Tensor, token_ids: torch.Tensor,
                       expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if moe_decode.use_decode_path(expert_ids.numel(), module.num_local_experts):
            return moe_decode.expert_outputs_decode(module, x, token_ids, expert_ids, weights)
        return fused_moe.expert_outputs(module, x, token_ids, expert_ids, weights)
