"""Reservation: room in a decode engine for a request whose prompt state arrives from elsewhere.

The reservation owns a state slot and the KV pages of the prompt (plus the first token and the
drafts of a speculative step); the first `cached_tokens` of them are the engine's own prefix
cache (shared pages, and a private copy of the page holding position cached_tokens - 1), so
only the KV after them arrives, with the Mamba state at the prompt's end. `write` copies each
LayerState into the reservation's own pages and slot and records which token ranges of which
layers arrived; `commit` refuses to start decoding from incomplete state, so a lost or
mismatched chunk can never be decoded from. `write` may run on a transfer thread while the
engine steps: it only touches pages and a slot no other sequence holds.

A local prefill (`local_prefill`) is born committed: the engine prefills the uncached rest
itself, nothing arrives, and release() aborts the running request.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import TYPE_CHECKING

import torch

from baton.workers.engine.handoff import LayerState, StateKind, StateTransferError
from baton.workers.engine.runner import SampledToken
from baton.workers.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from baton.workers.engine.engine import Engine
    from baton.workers.engine.request import Sequence


def _covers(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    reach = start
    for a, b in sorted(ranges):
        if a > reach:
            break
        reach = max(reach, b)
    return reach >= end


class Reservation:
    """Cache room for one request; see handoff.py for the life of a handed-off request."""

    def __init__(self, engine: Engine, seq: Sequence, n_tokens: int, cached_tokens: int = 0,
                 local: bool = False) -> None:
        self._engine = engine
        self._seq = seq
        self.request_id = seq.request_id
        self.n_tokens = n_tokens
        self.cached_tokens = cached_tokens
        """Prompt tokens [0, cached_tokens) this engine already holds; state arrives for the
        rest (or, with local_prefill, the engine computes it)."""
        self.local_prefill = local
        self._lock = threading.Lock()
        self._state = "committed" if local else "open"  # open -> committed | released
        self._received: dict[tuple[int, StateKind], list[tuple[int, int]]] = {}
        self._hidden: torch.Tensor | None = None
        self._block_row = torch.tensor(seq.pages, dtype=torch.int32)
        kinds = engine.model.layer_kinds
        num_main = engine.model.num_layers
        # What arrives: the KV after the cached prefix, MTP entries from the one the cached
        # prefix could not pair (its last position's), the Mamba state at the end.
        self._kv_start = cached_tokens
        self._mtp_start = max(cached_tokens - 1, 0)
        self._required: list[tuple[int, StateKind, int, int]] = []
        for layer, kind in enumerate(kinds[:num_main]):
            if kind == "attention":
                self._required.append((layer, StateKind.KV, self._kv_start, n_tokens))
            elif kind == "mamba":
                self._required.append((layer, StateKind.CONV, 0, n_tokens))
                self._required.append((layer, StateKind.SSM, 0, n_tokens))
        self._needs_mtp = seq.needs_mtp
        if self._needs_mtp:
            for j, kind in enumerate(kinds[num_main:]):
                if kind == "attention":
                    self._required.append(
                        (num_main + j, StateKind.MTP_KV, self._mtp_start, n_tokens - 1))
        # The last position's hidden state: the MTP drafter's input and the prompt snapshot's.
        self._required.append((num_main, StateKind.HIDDEN, n_tokens - 1, n_tokens))

    @property
    def state(self) -> str:
        return self._state

    def write(self, state: LayerState) -> None:
        """Copy one piece of state into the reserved pages / slot."""
        kind = StateKind(state.kind)
        n = self.n_tokens
        if kind in (StateKind.CONV, StateKind.SSM) and state.token_end != n:
            raise StateTransferError(
                f"{kind.value} of layer {state.layer}: state after {state.token_end} tokens, "
                f"the prompt has {n}"
            )
        if kind in (StateKind.KV, StateKind.MTP_KV):
            limit = n if kind == StateKind.KV else n - 1
            if not 0 <= state.token_start < state.token_end <= limit:
                raise StateTransferError(
                    f"{kind.value} of layer {state.layer}: token range {state.token_start}.."
                    f"{state.token_end} is outside 0..{limit}"
                )
            if state.tensor.dim() != 4 or state.tensor.shape[1] != (
                state.token_end - state.token_start
            ):
                raise StateTransferError(
                    f"{kind.value} of layer {state.layer}: tensor {tuple(state.tensor.shape)} "
                    f"does not hold tokens {state.token_start}..{state.token_end}"
                )
            # Positions this engine's own prefix cache holds are in pages it shares with other
            # sequences: they are never written (the same tokens' state; a sender that did not
            # know what is held sends them anyway).
            first = self._kv_start if kind == StateKind.KV else self._mtp_start
            if state.token_start < first:
                if state.token_end <= first:
                    return
                state = LayerState(state.layer, kind, first, state.token_end,
                                   state.tensor[:, first - state.token_start:])
        if kind == StateKind.HIDDEN:
            hidden = self._engine.model.config.hidden_size
            if (state.token_start, state.token_end) != (n - 1, n) or tuple(state.tensor.shape) != (
                hidden,
            ):
                raise StateTransferError(
                    f"hidden: expected position {n - 1} and shape ({hidden},), got "
                    f"{state.token_start}..{state.token_end} {tuple(state.tensor.shape)}"
                )
        # The lock is held through the copy: release() waits for it, so pages are never
        # freed (and handed to another request) while a write into them is in flight.
        with self._lock:
            if self._state != "open":
                raise StateTransferError(
                    f"reservation of {self.request_id!r} is {self._state}: no more writes"
                )
            if kind == StateKind.HIDDEN:
                model = self._engine.model
                self._hidden = state.tensor.to(model.device, model.dtype)
            else:
                try:
                    self._engine.cache.write_state(
                        state.layer,
                        kind.value,
                        self._block_row,
                        self._seq.slot,
                        state.token_start,
                        state.tensor,
                    )
                except ValueError as exc:
                    raise StateTransferError(f"{kind.value} of layer {state.layer}: {exc}") from exc
            key = (state.layer, kind)
            self._received.setdefault(key, []).append((state.token_start, state.token_end))

    def missing(self) -> list[str]:
        """What commit still waits for, e.g. ["kv layer 3 tokens 0..17"]."""
        with self._lock:
            return self._missing()

    def _missing(self) -> list[str]:
        out = []
        for layer, kind, start, end in self._required:
            if end > start and not _covers(self._received.get((layer, kind), []), start, end):
                out.append(f"{kind.value} layer {layer} tokens {start}..{end}")
        return out

    def commit(
        self,
        first_token: int,
        sampling: SamplingParams | None = None,
        logprob: float | None = None,
        top_logprobs: list[tuple[int, float]] | None = None,
    ) -> str:
        """Start decoding after the prompt and first_token; returns the request id.

        The first token comes out of the engine's next step() as a TokenEvent (with the
        logprobs given here), followed by the rest of the request's tokens.
        """
        engine = self._engine
        if not (isinstance(first_token, int) and 0 <= first_token < engine.vocab_size):
            raise ValueError(
                f"first_token={first_token!r} is invalid: a token id in [0, {engine.vocab_size})"
            )
        if sampling is not None:
            sampling.validate()
        with self._lock:
            if self._state != "open":
                raise StateTransferError(f"reservation of {self.request_id!r} is {self._state}")
            missing = self._missing()
            if missing:
                raise StateTransferError(
                    f"reservation of {self.request_id!r} is incomplete: missing "
                    + ", ".join(missing[:5])
                    + (" ..." if len(missing) > 5 else "")
                )
            self._state = "committed"
        seq = self._seq
        engine._end_reservation(self)
        if sampling is not None:
            fresh = engine._new_sequence(dataclasses.replace(seq.request, sampling=sampling))
            seq.request, seq.max_len, seq.eos_ids = fresh.request, fresh.max_len, fresh.eos_ids
            seq.detokenizer, seq.stop_matcher = fresh.detokenizer, fresh.stop_matcher
            seq.seed = fresh.seed
        seq.last_hidden = self._hidden
        if self._needs_mtp:
            seq.mtp_cached = self.n_tokens - 1
            seq.pending_hidden = self._hidden.unsqueeze(0)
        engine._commit_reserved(seq, SampledToken(first_token, logprob, list(top_logprobs or [])))
        return self.request_id

    def release(self) -> None:
        """Free everything; idempotent. After commit it aborts the running request."""
        with self._lock:
            state, self._state = self._state, "released"
        if state == "open":
            self._engine._end_reservation(self)
            self._engine._release_reserved(self._seq)
        elif state == "committed":
            self._engine.abort(self.request_id)
