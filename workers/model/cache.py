"""ModelCache: the paged KV cache of the attention layers and the Mamba state slots.

Layer indices: main layers 0..L-1, MTP sublayers L + j. Per attention layer (MTP ones
included) K and V pages `[num_pages, page_size, KV, D]` in the model dtype; per Mamba layer a
conv state `[num_slots, W, k - 1]` (model dtype) and an SSM state `[num_slots, h, p, n]`
(ssm_dtype, fp32 by default). With spec_tokens = K > 0 each Mamba layer also keeps, per slot,
the conv window `[W, k - 1 + K + 1]` and the SSM state after each of the 1 + K tokens of a
speculative verification, until `accept` makes one of them the slot's state.

KV travels token-major in read_state/write_state (`[2, n_tokens, KV, D]`), so two caches with
different page sizes or page ids exchange a sequence's state.

For the prefix cache, `allocate_snapshots(count, hidden_size)` adds snapshot rows: per Mamba
layer a conv and an SSM state `[count, ...]` shaped like a slot's, and a hidden state `[count, H]`
(the last position's output after norm_f). `save_snapshot` copies a slot's state into a row,
`restore_snapshot` copies a row into a slot, `copy_pages` duplicates whole KV pages (every
attention layer): a sequence that continues a cached prefix writes only into its own copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STATE_KINDS = ("kv", "conv", "ssm", "mtp_kv")


@dataclass(frozen=True)
class KVSpec:
    """What an attention layer keeps per token: K and V of kv_heads heads of head_dim."""

    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class MambaStateSpec:
    """What a Mamba layer keeps per sequence: the last conv_kernel - 1 conv inputs of width
    conv_dim, and the SSM state [h, p, n]."""

    conv_dim: int
    conv_kernel: int
    ssm_shape: tuple[int, int, int]


class ModelCache:
    """The caches one engine keeps for all its sequences (allocate with model.allocate_cache).

    layers maps a layer index to what that layer keeps (from its mixer's cache_spec()).
    """

    def __init__(self, layers: dict[int, KVSpec | MambaStateSpec], num_main_layers: int, *,
                 num_pages: int, page_size: int, num_slots: int, spec_tokens: int,
                 dtype: torch.dtype, ssm_dtype: torch.dtype, device: torch.device | str):
        for name, value, low in (("num_pages", num_pages, 1), ("page_size", page_size, 1),
                                 ("num_slots", num_slots, 1), ("spec_tokens", spec_tokens, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}: must be an integer >= {low}, got {value!r}")
        self.layers = dict(layers)
        self.num_main_layers = num_main_layers
        self.num_pages, self.page_size, self.num_slots = num_pages, page_size, num_slots
        self.spec_tokens = spec_tokens
        self.dtype, self.ssm_dtype = dtype, ssm_dtype
        self.device = torch.device(device)
        self._k: dict[int, torch.Tensor] = {}
        self._v: dict[int, torch.Tensor] = {}
        self._conv: dict[int, torch.Tensor] = {}
        self._ssm: dict[int, torch.Tensor] = {}
        self._conv_spec: dict[int, torch.Tensor] = {}
        self._ssm_spec: dict[int, torch.Tensor] = {}

        # Every tensor gets one row more than it shows (a page, a slot): the scratch row that
        # the inert rows of a fixed-shape step write into (static_step.py), so that a step
        # never branches on which of its rows are real. Only step_tensors() exposes it.
        self._with_scratch: dict[int, tuple[torch.Tensor, ...]] = {}

        def zeros(count, *shape, dtype=dtype):
            full = torch.zeros((count + 1, *shape), dtype=dtype, device=self.device)
            return full, full[:count]

        for layer, spec in self.layers.items():
            if isinstance(spec, KVSpec):
                k_full, self._k[layer] = zeros(num_pages, page_size, spec.kv_heads,
                                               spec.head_dim)
                v_full, self._v[layer] = zeros(num_pages, page_size, spec.kv_heads,
                                               spec.head_dim)
                self._with_scratch[layer] = (k_full, v_full)
                continue
            taps = spec.conv_kernel - 1
            conv_full, self._conv[layer] = zeros(num_slots, spec.conv_dim, taps)
            ssm_full, self._ssm[layer] = zeros(num_slots, *spec.ssm_shape, dtype=ssm_dtype)
            full = (conv_full, ssm_full)
            if spec_tokens:
                conv_spec, self._conv_spec[layer] = zeros(num_slots, spec.conv_dim,
                                                          taps + spec_tokens + 1)
                ssm_spec, self._ssm_spec[layer] = zeros(num_slots, spec_tokens + 1,
                                                        *spec.ssm_shape, dtype=ssm_dtype)
                full = (*full, conv_spec, ssm_spec)
            self._with_scratch[layer] = full
        # Tokens of the last speculative verification per slot (0: nothing to accept).
        self._pending = [0] * num_slots
        self.num_snapshots = 0
        self._snap_conv: dict[int, torch.Tensor] = {}
        self._snap_ssm: dict[int, torch.Tensor] = {}
        self._snap_hidden: torch.Tensor | None = None

    # ------------------------------------------------------------------ sizes
    def bytes_per_page(self) -> int:
        """Bytes one KV page takes over all attention layers (MTP included)."""
        return sum((k[0].numel() + v[0].numel()) * k.element_size()
                   for k, v in zip(self._k.values(), self._v.values()))

    def bytes_per_slot(self) -> int:
        """Bytes one Mamba state slot takes over all Mamba layers (spec buffers included)."""
        tensors = [*self._conv.values(), *self._ssm.values(), *self._conv_spec.values(),
                   *self._ssm_spec.values()]
        return sum(t[0].numel() * t.element_size() for t in tensors)

    def bytes_per_snapshot(self, hidden_size: int) -> int:
        """Bytes one prefix-cache snapshot takes: every Mamba layer's conv + SSM state (no
        speculation buffers: snapshots hold committed state only) and one hidden state."""
        mamba = sum(t[0].numel() * t.element_size()
                    for t in (*self._conv.values(), *self._ssm.values()))
        return mamba + hidden_size * torch.empty((), dtype=self.dtype).element_size()

    def transfer_bytes(self, hidden_size: int) -> dict[str, int]:
        """Bytes a handoff carries of each state kind: kv and mtp_kv per token (main / MTP
        attention layers), conv and ssm per request (all Mamba layers), hidden per request."""
        main = [layer for layer in self._k if layer < self.num_main_layers]
        mtp = [layer for layer in self._k if layer >= self.num_main_layers]

        def per_token(layers: list[int]) -> int:
            return sum(2 * self._k[layer][0, 0].numel() * self._k[layer].element_size()
                       for layer in layers)

        return {
            "kv": per_token(main),
            "mtp_kv": per_token(mtp),
            "conv": sum(t[0].numel() * t.element_size() for t in self._conv.values()),
            "ssm": sum(t[0].numel() * t.element_size() for t in self._ssm.values()),
            "hidden": hidden_size * torch.empty((), dtype=self.dtype).element_size(),
        }

    # ------------------------------------------------------------------ snapshots
    def allocate_snapshots(self, count: int, hidden_size: int) -> None:
        """Adds `count` snapshot rows (see the module docstring); 0 removes them."""
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"count: must be an integer >= 0, got {count!r}")
        self.num_snapshots = count
        self._snap_conv = {layer: torch.zeros((count, *t.shape[1:]), dtype=t.dtype,
                                              device=self.device)
                           for layer, t in self._conv.items()}
        self._snap_ssm = {layer: torch.zeros((count, *t.shape[1:]), dtype=t.dtype,
                                             device=self.device)
                          for layer, t in self._ssm.items()}
        self._snap_hidden = torch.zeros(count, hidden_size, dtype=self.dtype, device=self.device)

    def _snapshot_row(self, index: int) -> int:
        if not 0 <= int(index) < self.num_snapshots:
            raise ValueError(f"index: snapshot {index!r} outside [0, {self.num_snapshots})")
        return int(index)

    @torch.inference_mode()
    def save_snapshot(self, slot: int, index: int, hidden: torch.Tensor) -> None:
        """Row `index` := slot's committed conv + SSM state of every Mamba layer, and hidden
        [H]."""
        slot, index = self._slot(slot), self._snapshot_row(index)
        for layer, conv in self._conv.items():
            self._snap_conv[layer][index] = conv[slot]
            self._snap_ssm[layer][index] = self._ssm[layer][slot]
        self._snap_hidden[index] = hidden.to(self._snap_hidden.device, self._snap_hidden.dtype)

    @torch.inference_mode()
    def restore_snapshot(self, index: int, slot: int) -> torch.Tensor:
        """Slot's state := row `index`; returns a copy of the row's hidden state [H]."""
        slot, index = self._slot(slot), self._snapshot_row(index)
        for layer, conv in self._conv.items():
            conv[slot] = self._snap_conv[layer][index]
            self._ssm[layer][slot] = self._snap_ssm[layer][index]
        self._pending[slot] = 0
        return self._snap_hidden[index].clone()

    @torch.inference_mode()
    def copy_pages(self, src: list[int], dst: list[int]) -> None:
        """KV pages dst[i] := src[i] in every attention layer (MTP layers included)."""
        if len(src) != len(dst):
            raise ValueError(f"dst: {len(dst)} pages for {len(src)} source pages")
        if not src:
            return
        for pages in (src, dst):
            if any(not 0 <= p < self.num_pages for p in pages):
                raise ValueError(f"pages: {pages} has a page outside [0, {self.num_pages})")
        s = torch.tensor(src, device=self.device)
        d = torch.tensor(dst, device=self.device)
        for layer in self._k:
            self._k[layer][d] = self._k[layer][s]
            self._v[layer][d] = self._v[layer][s]

    # ------------------------------------------------------------------ layer access
    def kv_pages(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self._k:
            raise ValueError(f"layer: {layer} is not an attention layer")
        return self._k[layer], self._v[layer]

    def mamba_state(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self._conv:
            raise ValueError(f"layer: {layer} is not a Mamba layer")
        return self._conv[layer], self._ssm[layer]

    def spec_state(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.spec_tokens:
            raise ValueError("spec_verify needs a cache allocated with spec_tokens > 0")
        return self._conv_spec[layer], self._ssm_spec[layer]

    def step_tensors(self, layer: int) -> tuple[torch.Tensor, ...]:
        """A layer's tensors with their scratch row last (page num_pages, slot num_slots):
        (k_pages, v_pages) [num_pages + 1, page_size, KV, D] of an attention layer; (conv,
        ssm[, conv_spec, ssm_spec]) [num_slots + 1, ...] of a Mamba layer. The scratch row
        holds no sequence's state: a fixed-shape step writes its inert rows there."""
        if layer not in self._with_scratch:
            raise ValueError(f"layer: {layer} keeps no state in the cache")
        return self._with_scratch[layer]

    # ------------------------------------------------------------------ speculation
    def mark_pending(self, slots: list[int], num_tokens: list[int]) -> None:
        for slot, n in zip(slots, num_tokens):
            self._pending[slot] = n

    @torch.inference_mode()
    def accept(self, slots: torch.Tensor, num_accepted: torch.Tensor) -> None:
        """After a spec_verify forward: the state after token num_accepted[i] (1..1+K) of
        sequence i becomes slot slots[i]'s state; the other snapshots are forgotten."""
        slot_list = [int(s) for s in slots.tolist()]
        counts = [int(n) for n in num_accepted.tolist()]
        if len(slot_list) != len(counts):
            raise ValueError(
                f"num_accepted: {len(counts)} entries for {len(slot_list)} slots")
        for slot, n in zip(slot_list, counts):
            if not 0 <= slot < self.num_slots:
                raise ValueError(f"slots: {slot} outside [0, {self.num_slots})")
            if not 1 <= n <= self._pending[slot]:
                raise ValueError(
                    f"num_accepted: {n} for slot {slot}, whose last verification had "
                    f"{self._pending[slot]} tokens (allowed 1..{self._pending[slot]})")
        if not slot_list:
            return
        index = torch.tensor(slot_list, device=self.device)
        accepted = torch.tensor(counts, device=self.device)
        for layer in self._conv:
            # The conv window after token n is columns n .. n + k - 2 of [old state, new
            # inputs].
            taps = self.layers[layer].conv_kernel - 1
            columns = accepted[:, None] + torch.arange(taps, device=self.device)  # [S, k-1]
            window = self._conv_spec[layer][index]  # [S, W, k-1+K+1]
            gather = columns[:, None, :].expand(-1, window.shape[1], -1)
            self._conv[layer][index] = torch.gather(window, 2, gather)
            self._ssm[layer][index] = self._ssm_spec[layer][index, accepted - 1]
        for slot in slot_list:
            self._pending[slot] = 0

    # ------------------------------------------------------------------ state transfer
    def _check_layer(self, layer: int, kind: str) -> None:
        if kind not in STATE_KINDS:
            raise ValueError(f"kind: {kind!r} is not one of {STATE_KINDS}")
        in_mtp = layer >= self.num_main_layers
        if kind == "mtp_kv" and not in_mtp or kind == "kv" and in_mtp:
            raise ValueError(
                f"kind: {kind!r} does not match layer {layer} (main layers 0.."
                f"{self.num_main_layers - 1} use 'kv', MTP layers L + j use 'mtp_kv')")
        if kind in ("kv", "mtp_kv") and layer not in self._k:
            raise ValueError(f"layer: {layer} is not an attention layer")
        if kind in ("conv", "ssm") and layer not in self._conv:
            raise ValueError(f"layer: {layer} is not a Mamba layer")

    def _token_pages(self, block_table_row: torch.Tensor, token_start: int, token_end: int):
        if not 0 <= token_start <= token_end:
            raise ValueError(f"token range: need 0 <= start <= end, got {token_start}..{token_end}")
        positions = torch.arange(token_start, token_end, device=self.device)
        table = block_table_row.to(self.device).long()
        page_index = positions // self.page_size
        if token_end > 0 and (int(page_index.max()) >= table.numel()
                              or bool((table[page_index] < 0).any())):
            raise ValueError(
                f"block_table_row: has no page for tokens {token_start}..{token_end}")
        return table[page_index], positions % self.page_size

    @torch.inference_mode()
    def read_state(self, layer: int, kind: str, block_table_row: torch.Tensor | None,
                   slot: int | None, token_start: int = 0, token_end: int = 0) -> torch.Tensor:
        """A copy of one layer's state of one sequence: kv/mtp_kv [2, n, KV, D] for tokens
        token_start..token_end-1, conv [W, k-1], ssm [h, p, n]."""
        self._check_layer(layer, kind)
        if kind in ("kv", "mtp_kv"):
            pages, offsets = self._token_pages(block_table_row, token_start, token_end)
            return torch.stack([self._k[layer][pages, offsets], self._v[layer][pages, offsets]])
        states = self._conv if kind == "conv" else self._ssm
        return states[layer][self._slot(slot)].clone()

    @torch.inference_mode()
    def write_state(self, layer: int, kind: str, block_table_row: torch.Tensor | None,
                    slot: int | None, token_start: int, tensor: torch.Tensor) -> None:
        """The inverse of read_state: KV of tokens token_start.. into the row's pages, or the
        slot's conv / SSM state."""
        self._check_layer(layer, kind)
        if kind in ("kv", "mtp_kv"):
            k_pages = self._k[layer]
            if tensor.dim() != 4 or tensor.shape[0] != 2 or tensor.shape[2:] != k_pages.shape[2:]:
                raise ValueError(
                    f"tensor: kv state must be [2, n, {k_pages.shape[2]}, {k_pages.shape[3]}], "
                    f"got {tuple(tensor.shape)}")
            pages, offsets = self._token_pages(block_table_row, token_start,
                                               token_start + tensor.shape[1])
            k_pages[pages, offsets] = tensor[0].to(k_pages.device, k_pages.dtype)
            self._v[layer][pages, offsets] = tensor[1].to(k_pages.device, k_pages.dtype)
            return
        states = (self._conv if kind == "conv" else self._ssm)[layer]
        if tuple(tensor.shape) != tuple(states.shape[1:]):
            raise ValueError(
                f"tensor: {kind} state must be {tuple(states.shape[1:])}, got "
                f"{tuple(tensor.shape)}")
        states[self._slot(slot)] = tensor.to(states.device, states.dtype)

    def _slot(self, slot: int | None) -> int:
        if slot is None or not 0 <= int(slot) < self.num_slots:
            raise ValueError(f"slot: {slot!r} outside [0, {self.num_slots})")
        return int(slot)
