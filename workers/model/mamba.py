"""Mamba2 mixer of Nemotron-H: in_proj -> causal conv -> selective state space scan -> gated
norm -> out_proj, with a chunked (SSD) scan for prompts and a single-token step for decode.

Shapes: T tokens, B sequences, I = h * p inner width, h heads, p head dim, g groups sharing
B and C, n state size, c chunks, l (and s) positions within a chunk, W = conv_dim =
I + 2 * g * n, k = conv_kernel.

The conv state is the last k - 1 conv inputs (pre-activation xBC) of a sequence; the SSM state
is [h, p, n] per sequence, kept in fp32 unless the config asks otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from baton.kernels import (
    causal_conv1d,
    causal_conv1d_update,
    mamba_chunk_scan,
    ssm_state_update,
)

from .cache import MambaStateSpec
from .config import NemotronHConfig
from .layers import FormatPlan, GatedRMSNorm, as_dtype, as_f32, quant_linear


def segment_sum(x: torch.Tensor) -> torch.Tensor:
    """x [..., l] -> [..., l, l] with out[i, j] = sum(x[j+1 : i+1]) for j <= i, -inf above."""
    length = x.shape[-1]
    expanded = x[..., None].expand(*x.shape, length)  # [..., l(i), l(j)] holds x[i]
    below = torch.tril(torch.ones(length, length, dtype=torch.bool, device=x.device), -1)
    sums = torch.cumsum(expanded.masked_fill(~below, 0), dim=-2)
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=x.device), 0)
    return sums.masked_fill(~causal, -torch.inf)


def ssd_chunk_scan(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   c: torch.Tensor, chunk_size: int, initial_state: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Mamba2 scan in its chunked (state space duality) form, fp32.

    x [B, T, h, p], dt [B, T, h] (after softplus and clamp), a [h] (negative), b and c
    [B, T, g, n], initial_state [B, h, p, n] or None (zeros).
    Returns y [B, T, h, p] (without the D skip) and the final state [B, h, p, n].
    """
    batch, length, heads, _ = x.shape
    groups = b.shape[2]
    b = as_f32(b).repeat_interleave(heads // groups, dim=2)  # [B, T, h, n]
    c = as_f32(c).repeat_interleave(heads // groups, dim=2)
    x_dt = as_f32(x) * as_f32(dt)[..., None]  # [B, T, h, p]
    a_dt = as_f32(a) * as_f32(dt)  # [B, T, h]
    # Padding with dt = 0 adds no input and no decay, so the final state is unaffected.
    pad = (-length) % chunk_size
    if pad:
        x_dt = F.pad(x_dt, (0, 0, 0, 0, 0, pad))
        a_dt = F.pad(a_dt, (0, 0, 0, pad))
        b = F.pad(b, (0, 0, 0, 0, 0, pad))
        c = F.pad(c, (0, 0, 0, 0, 0, pad))
    chunks = (length + pad) // chunk_size
    x_dt = x_dt.view(batch, chunks, chunk_size, heads, -1)  # [B, c, l, h, p]
    b = b.view(batch, chunks, chunk_size, heads, -1)  # [B, c, l, h, n]
    c = c.view(batch, chunks, chunk_size, heads, -1)
    a_dt = a_dt.view(batch, chunks, chunk_size, heads).permute(0, 3, 1, 2)  # [B, h, c, l]
    a_cumsum = torch.cumsum(a_dt, dim=-1)

    # Within each chunk: a causal, decay-weighted "attention" of c over b.
    decay = torch.exp(segment_sum(a_dt))  # [B, h, c, l, s]
    scores = torch.einsum("bclhn,bcshn->bhcls", c, b) * decay
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, x_dt)

    # Each chunk's contribution to the state at its end.
    decay_to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum)  # [B, h, c, l]
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", b, decay_to_end, x_dt)

    # Carry states across chunks (from the initial state).
    if initial_state is None:
        initial_state = torch.zeros_like(chunk_states[:, 0])
    states = torch.cat([as_f32(initial_state)[:, None], chunk_states], dim=1)  # [B, c+1, h, p, n]
    chunk_decay = torch.exp(segment_sum(F.pad(a_cumsum[..., -1], (1, 0))))  # [B, h, c+1, c+1]
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    start_states, final_state = states[:, :-1], states[:, -1]

    # The start state's contribution to each position.
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", c, start_states, torch.exp(a_cumsum))
    y = (y_diag + y_off).reshape(batch, chunks * chunk_size, heads, -1)[:, :length]
    return y, final_state


def ssm_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor,
             b: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence, fp32: state [B, h, p, n], x [B, h, p], dt [B, h],
    b and c [B, g, n]. Returns y [B, h, p] (without the D skip) and the new state."""
    heads, groups = x.shape[1], b.shape[1]
    b = as_f32(b).repeat_interleave(heads // groups, dim=1)  # [B, h, n]
    c = as_f32(c).repeat_interleave(heads // groups, dim=1)
    dt = as_f32(dt)
    decay = torch.exp(dt * as_f32(a))[..., None, None]  # [B, h, 1, 1]
    state = as_f32(state) * decay + (dt[..., None] * as_f32(x))[..., None] * b[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", state, c)
    return y, state


class Mamba2Mixer(nn.Module):
    """The 'M' layer. Parameter names follow the checkpoint (`mixer.in_proj.weight`, ...)."""

    def __init__(self, config: NemotronHConfig, name: str, formats: FormatPlan,
                 dtype: torch.dtype):
        super().__init__()
        c = config
        self.heads, self.head_dim = c.mamba_num_heads, c.mamba_head_dim
        self.groups, self.state_size = c.n_groups, c.ssm_state_size
        self.inner = c.mamba_intermediate
        self.conv_dim = c.conv_dim
        self.kernel = c.conv_kernel
        self.chunk_size = c.chunk_size
        self.time_step_limit = c.time_step_limit
        projection = self.inner + self.conv_dim + self.heads  # rows z, xBC, dt
        self.in_proj = quant_linear(c.hidden_size, projection, f"{name}.in_proj", formats, dtype,
                                    c.use_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim,
                                bias=c.use_conv_bias, dtype=dtype)
        self.dt_bias = nn.Parameter(torch.zeros(self.heads, dtype=dtype))
        self.A_log = nn.Parameter(torch.zeros(self.heads, dtype=dtype))
        self.D = nn.Parameter(torch.ones(self.heads, dtype=dtype))
        self.norm = GatedRMSNorm(self.inner, self.inner // self.groups, c.layer_norm_epsilon,
                                 dtype)
        self.out_proj = quant_linear(self.inner, c.hidden_size, f"{name}.out_proj", formats,
                                     dtype, c.use_bias)

    def cache_spec(self) -> MambaStateSpec:
        """What this layer keeps per sequence in a state slot."""
        return MambaStateSpec(self.conv_dim, self.kernel,
                              (self.heads, self.head_dim, self.state_size))

    # ------------------------------------------------------------------ pieces
    def _split(self, projected: torch.Tensor):
        return projected.split([self.inner, self.conv_dim, self.heads], dim=-1)  # z, xBC, dt

    def _time_step(self, dt: torch.Tensor) -> torch.Tensor:
        # The clamp is the config's time_step_limit (the released models' (0, inf)).
        low, high = self.time_step_limit
        return F.softplus(as_f32(dt) + as_f32(self.dt_bias)).clamp(min=low, max=high)

    def _conv(self, window: torch.Tensor) -> torch.Tensor:
        """window [B, W, k - 1 + n] of conv inputs -> silu(conv) [B, W, n] (valid positions)."""
        out = F.conv1d(window.to(self.conv1d.weight.dtype), self.conv1d.weight,
                       self.conv1d.bias, groups=self.conv_dim)
        return F.silu(out)

    def _split_xbc(self, xbc: torch.Tensor):
        """xbc [..., W] -> x [..., h, p], b [..., g, n], c [..., g, n]."""
        x, b, c = xbc.split([self.inner, self.groups * self.state_size,
                             self.groups * self.state_size], dim=-1)
        lead = xbc.shape[:-1]
        return (x.reshape(*lead, self.heads, self.head_dim),
                b.reshape(*lead, self.groups, self.state_size),
                c.reshape(*lead, self.groups, self.state_size))

    def _a(self) -> torch.Tensor:
        return -torch.exp(as_f32(self.A_log))

    def _output(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
        """y, x [..., h, p] fp32 -> out_proj(norm(y + D x, z))."""
        y = y + as_f32(self.D)[:, None] * as_f32(x)
        y = self.norm(y.flatten(-2), z)
        return self.out_proj(as_dtype(y, dtype))

    def _scan(self, xbc_window: torch.Tensor, dt: torch.Tensor,
              ssm_state: torch.Tensor | None):
        """One or more whole sequences: xbc_window [B, W, k-1+T] (conv state then new inputs),
        dt [B, T, h] raw. Returns y [B, T, h, p], x [B, T, h, p], final state."""
        xbc = self._conv(xbc_window).transpose(1, 2)  # [B, T, W]
        x, b, c = self._split_xbc(xbc)
        y, final = ssd_chunk_scan(x, self._time_step(dt), self._a(), b, c, self.chunk_size,
                                  ssm_state)
        return y, x, final

    # ------------------------------------------------------------------ full forward
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, H] from zero state -> [B, T, H]."""
        z, xbc, dt = self._split(self.in_proj(hidden))
        window = F.pad(xbc.transpose(1, 2), (self.kernel - 1, 0))  # [B, W, k-1+T]
        y, x, _ = self._scan(window, dt, None)
        return self._output(y, x, z, hidden.dtype)

    # ------------------------------------------------------------------ cache-aware forward
    def forward_cached(self, hidden: torch.Tensor, plan, cache, layer: int) -> torch.Tensor:
        """hidden [T, H] of a ForwardBatch; reads and writes each sequence's slot state."""
        if plan.uses_kernels:  # the one place the path is chosen (model.set_kernels)
            if plan.static_rows is not None:
                return self._forward_static(hidden, plan, cache, layer)
            return self._forward_kernels(hidden, plan, cache, layer)
        z, xbc, dt = self._split(self.in_proj(hidden))
        conv_states, ssm_states = cache.mamba_state(layer)  # [S*, W, k-1], [S*, h, p, n]
        y = torch.empty(hidden.shape[0], self.heads, self.head_dim, dtype=torch.float32,
                        device=hidden.device)
        x_all = torch.empty_like(y)
        if plan.spec_verify:
            self._verify(xbc, dt, y, x_all, plan, cache, layer)
        else:
            if plan.decode_seqs:
                self._decode(xbc, dt, y, x_all, plan, conv_states, ssm_states)
            for group in plan.chunk_groups:
                self._chunk(group, xbc, dt, y, x_all, conv_states, ssm_states)
        return self._output(y, x_all, z, hidden.dtype)

    def _forward_kernels(self, hidden: torch.Tensor, plan, cache, layer: int) -> torch.Tensor:
        """The cached step through baton.kernels (a KernelPlan): the slot states are read and
        written in place through the slot ids, inert rows (slot -1) left alone. One path per
        step kind: verification (per-token snapshots), decode (one token per sequence), and
        the varlen chunked scan for anything longer (prompt chunks beside decode tokens)."""
        z, xbc, dt = self._split(self.in_proj(hidden))
        conv_states, ssm_states = cache.mamba_state(layer)  # [S*, W, k-1], [S*, h, p, n]
        weight, bias, slots = self.conv1d.weight, self.conv1d.bias, plan.slot_ids
        flags = plan.has_initial_state
        args = dict(D=self.D, dt_bias=self.dt_bias, dt_limit=self.time_step_limit,
                    has_initial_state=flags)
        if plan.spec_verify:
            conv_spec, ssm_spec = cache.spec_state(layer)
            xbc = causal_conv1d_update(xbc, conv_states, weight, bias, slots,
                                       has_initial_state=flags, cu_seqlens=plan.cu_seqlens,
                                       max_tokens=plan.max_tokens, conv_windows=conv_spec)
            x, b, c = self._split_xbc(xbc)
            y = ssm_state_update(ssm_states, x, dt, self._a(), b, c, slots,
                                 cu_seqlens=plan.cu_seqlens, max_tokens=plan.max_tokens,
                                 snapshots=ssm_spec, **args)
        elif plan.max_tokens == 1:
            xbc = causal_conv1d_update(xbc, conv_states, weight, bias, slots,
                                       has_initial_state=flags)
            x, b, c = self._split_xbc(xbc)
            y = ssm_state_update(ssm_states, x, dt, self._a(), b, c, slots, **args)
        else:
            xbc = causal_conv1d(xbc, weight, bias, plan.chunks, conv_states, slots,
                                has_initial_state=flags)
            x, b, c = self._split_xbc(xbc)
            y = mamba_chunk_scan(x, dt, self._a(), b, c, plan.chunks, ssm_states, slots, **args)
        # The kernels add the D skip: the gated norm and out_proj remain.
        return self.out_proj(self.norm(y.flatten(-2), z).to(hidden.dtype))

    def _forward_static(self, hidden: torch.Tensor, plan, cache, layer: int) -> torch.Tensor:
        """The fixed-shape step (static_step.py): one token per sequence (decode), or a
        verification's 1 + K tokens with the state after each kept for cache.accept. Inert
        rows read and write the cache's scratch slot."""
        z, xbc, dt = self._split(self.in_proj(hidden))
        rows = plan.static_rows
        q_len = rows.max_tokens
        if not plan.spec_verify and q_len != 1:
            raise ValueError(f"max_tokens: the fixed-shape Mamba step takes 1 token per "
                             f"sequence, or a verification, got {q_len}")
        conv_states, ssm_states, *spec = cache.step_tensors(layer)
        slots, keep = rows.slots, rows.has_state
        conv = torch.where(keep[:, None, None], conv_states[slots], 0).to(xbc.dtype)
        window = torch.cat([conv, rows.pad(xbc).transpose(1, 2)], -1)  # [S, W, k-1+Q]
        taps = window.unfold(-1, self.kernel, 1)  # [S, W, Q, k]
        conv_out = (taps * self.conv1d.weight[:, 0, :][:, None, :]).sum(-1)
        if self.conv1d.bias is not None:
            conv_out = conv_out + self.conv1d.bias[:, None]
        x, b, c = self._split_xbc(F.silu(conv_out).transpose(1, 2))  # [S, Q, h, p], [S, Q, g, n]
        x = as_f32(x)
        per_group = self.heads // self.groups
        b = as_f32(b).repeat_interleave(per_group, dim=2)  # [S, Q, h, n]
        c = as_f32(c).repeat_interleave(per_group, dim=2)
        step_dt = self._time_step(rows.pad(dt))  # [S, Q, h]
        decay = torch.exp(step_dt * self._a())  # [S, Q, h]
        state = as_f32(torch.where(keep[:, None, None, None], ssm_states[slots], 0))
        ys = []
        for j in range(q_len):  # at most 1 + K tokens
            state = state * decay[:, j, :, None, None] + \
                (step_dt[:, j, :, None] * x[:, j])[..., None] * b[:, j, :, None, :]
            ys.append(torch.einsum("shpn,shn->shp", state, c[:, j]))
            if plan.spec_verify:
                ssm_spec = spec[1]
                snapshot_rows = slots * ssm_spec.shape[1] + j
                ssm_spec.view(-1, *ssm_spec.shape[2:]).index_copy_(
                    0, snapshot_rows, as_dtype(state, ssm_spec.dtype))
        if plan.spec_verify:
            conv_spec = spec[0]
            conv_spec[..., :window.shape[-1]].index_copy_(0, slots,
                                                           as_dtype(window, conv_spec.dtype))
        else:
            conv_states.index_copy_(0, slots, as_dtype(window[..., 1:], conv_states.dtype))
            ssm_states.index_copy_(0, slots, as_dtype(state, ssm_states.dtype))
        y = torch.stack(ys, 1) + as_f32(self.D)[:, None] * x  # [S, Q, h, p]
        y = rows.unpad(y)  # [T, h, p]
        return self.out_proj(as_dtype(self.norm(y.flatten(-2), z), hidden.dtype))

    def _slot_state(self, states: torch.Tensor, slots: torch.Tensor,
                    fresh: torch.Tensor) -> torch.Tensor:
        """The slots' states, zero where the sequence starts fresh (cached_len == 0)."""
        current = states[slots]
        return torch.where(fresh.view(-1, *([1] * (current.dim() - 1))),
                           torch.zeros_like(current), current)

    def _decode(self, xbc, dt, y, x_all, plan, conv_states, ssm_states) -> None:
        """All single-token sequences in one batched step."""
        rows, slots = plan.decode_token_index, plan.decode_slots
        conv = self._slot_state(conv_states, slots, plan.decode_fresh)  # [S, W, k-1]
        window = torch.cat([as_dtype(conv, xbc.dtype), xbc[rows].unsqueeze(-1)], -1)  # [S, W, k]
        x, b, c = self._split_xbc(self._conv(window).squeeze(-1))
        state = self._slot_state(ssm_states, slots, plan.decode_fresh)
        out, state = ssm_step(state, x, self._time_step(dt[rows]), self._a(), b, c)
        conv_states[slots] = as_dtype(window[..., 1:], conv_states.dtype)
        ssm_states[slots] = as_dtype(state, ssm_states.dtype)
        y[rows], x_all[rows] = out, as_f32(x)

    def _chunk(self, group, xbc, dt, y, x_all, conv_states, ssm_states) -> None:
        """Prompt chunks of equal length through the chunked scan, continuing the slots'
        states (or starting from zero when nothing is cached)."""
        new = xbc[group.rows].transpose(1, 2)  # [G, W, n]
        if group.cached:
            conv = as_dtype(conv_states[group.slots], new.dtype)
            ssm = ssm_states[group.slots]
        else:
            conv = new.new_zeros(new.shape[0], self.conv_dim, self.kernel - 1)
            ssm = None
        window = torch.cat([conv, new], dim=-1)  # [G, W, k-1+n]
        out, x, final = self._scan(window, dt[group.rows], ssm)
        conv_states[group.slots] = as_dtype(window[..., -(self.kernel - 1):], conv_states.dtype)
        ssm_states[group.slots] = as_dtype(final, ssm_states.dtype)
        y[group.rows], x_all[group.rows] = out, as_f32(x)

    def _verify(self, xbc, dt, y, x_all, plan, cache, layer) -> None:
        """Speculative verification: step through each sequence's 1 + K tokens from its slot
        state, keeping the state after every token in the cache's spec buffers; the slot's own
        state is left alone until cache.accept picks one."""
        conv_states, ssm_states = cache.mamba_state(layer)
        conv_spec, ssm_spec = cache.spec_state(layer)  # [S*, W, k-1+K+1], [S*, K+1, h, p, n]
        slots, fresh = plan.slots_tensor, plan.fresh
        rows = plan.verify_token_index  # [S, max_n] token rows (padded with the last row)
        steps = rows.shape[1]
        conv = self._slot_state(conv_states, slots, fresh).to(xbc.dtype)  # [S, W, k-1]
        window = torch.cat([conv, xbc[rows].transpose(1, 2)], dim=-1)  # [S, W, k-1+max_n]
        xbc_out = self._conv(window).transpose(1, 2)  # [S, max_n, W]
        x, b, c = self._split_xbc(xbc_out)
        step_dt = self._time_step(dt[rows])  # [S, max_n, h]
        state = self._slot_state(ssm_states, slots, fresh).float()
        a = self._a()
        for j in range(steps):  # at most 1 + K draft positions
            out, state = ssm_step(state, x[:, j], step_dt[:, j], a, b[:, j], c[:, j])
            ssm_spec[slots, j] = as_dtype(state, ssm_spec.dtype)
            seqs, token_rows = plan.verify_step_seqs[j], plan.verify_step_rows[j]
            y[token_rows] = out[seqs]
            x_all[token_rows] = as_f32(x[seqs, j])
        conv_spec[slots, :, : window.shape[-1]] = as_dtype(window, conv_spec.dtype)
        cache.mark_pending(plan.slots, plan.seq_lens)
