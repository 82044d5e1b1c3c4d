"""What moves between engines when one prefills a request and another decodes it.

A request's life across two engines (DESIGN.md, Seams: Engine <-> transfer):

1. The decode engine D reserves room: `res = engine.reserve(request, local_prefill_max_tokens)`
   takes a state slot and KV pages, and pins the longest prefix d = res.cached_tokens its
   prefix cache holds (KV and a Mamba snapshot at d); or raises CacheFull. When d leaves at
   most local_prefill_max_tokens (res.local_prefill), D prefills the rest itself and nothing
   below happens.
2. The prefill engine P runs `engine.prefill(request, sink, sink_from=d)`, from its own best
   hit. As each layer finishes the prompt it calls `sink.on_layer(LayerState)`: attention KV
   of positions >= d ([2, n, KVH, D], token-major; what P's own hit covered is read from its
   cache), each Mamba layer's conv and SSM state at the prompt's end, the MTP layers' KV
   (layers L + j, positions d-1..n-2: MTP entry i pairs hidden state i with token i+1), and
   the hidden state of the last prompt position (kind hidden, layer L, [H]), which D's MTP
   drafter and D's snapshot of the prompt need. P samples the first token and releases its
   cache (into its own prefix cache).
3. The transfer layer binds the reservation to the transfer first: `res.bind(token,
   chain_hash)` accepts only the reservation's own token and the chain hash of its own prompt
   (reservation.py: DecodeReservation, OPEN -> RECEIVING), then hands each LayerState to
   `res.write(state)` on D.
4. `res.commit(first_token, sampling)` checks that every piece arrived and moves the request
   into D's running batch, which continues as if D had prefilled it; or `res.release()` frees
   everything (idempotent; after commit it aborts the request).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import torch


class StateKind(str, Enum):
    """Which piece of per-request state a LayerState carries."""

    KV = "kv"
    CONV = "conv"
    SSM = "ssm"
    MTP_KV = "mtp_kv"
    HIDDEN = "hidden"


@dataclass(frozen=True)
class LayerState:
    """One layer's state for a token range of one request."""

    layer: int
    """Main layers 0..L-1; MTP layers L + j; hidden states use L."""
    kind: StateKind
    token_start: int
    """First token position covered (0 for conv/ssm, which summarize [0, token_end))."""
    token_end: int
    """One past the last token position covered."""
    tensor: torch.Tensor
    """kv / mtp_kv [2, n, KVH, D]; conv [conv_dim, d_conv - 1]; ssm [H, P, N]; hidden [H].
    A fresh copy on the sending engine's device (model dtype; ssm in the SSM state dtype):
    the receiver owns it. The receiving engine accepts it on any device."""


class PrefillSink(Protocol):
    """Receives each layer's state as soon as the prefill engine has it."""

    def on_layer(self, state: LayerState) -> None: ...


class CacheFull(RuntimeError):
    """The engine has no room (pages or state slot) for the request right now."""


class PrefillAborted(RuntimeError):
    """A prefill's request was aborted (its caller went away) before the prefill finished."""


@dataclass
class PrefillResult:
    """What a prefill produced besides the state it handed to the sink."""

    request_id: str
    first_token: int
    logprob: float | None
    """Logprob of first_token when the request asked for logprobs."""
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    num_prompt_tokens: int = 0
    finish_reason: str | None = None
    """"stop" / "length" when the first token already ends the request (decoding may skip)."""
    prefill_seconds: float = 0.0
    cached_tokens: int = 0
    """Prompt tokens this engine's prefix cache served instead of computing them."""


class StateTransferError(ValueError):
    """A LayerState that does not fit the reservation (wrong range, layer, kind or shape)."""
