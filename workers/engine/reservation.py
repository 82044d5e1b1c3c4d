"""DecodeReservation: one request's room in a decode engine, from Reserve to its end, as one
state machine (DESIGN.md, Round 3 seams: one reservation, one state machine).

    OPEN ──bind──> RECEIVING ──commit──> COMMITTED ──attach──> STREAMING
      │               │                    │                     │
      └───────────────┴───── end ──────────┴─────────────────────┴──> ENDED

OPEN       Reserved: a state slot and KV pages for the prompt (plus the first token and the
           drafts of a speculative step), with the cached prefix [0, cached_tokens) pinned
           (pages shared with other sequences: read only). Nothing is written. A local prefill
           (the engine computes the uncached rest itself) is born COMMITTED.
RECEIVING  bind(token, chain_hash) accepted a transfer's handshake: it presented this
           reservation's token and the chain hash of exactly this prompt (prompt_chain_hash:
           every token). That transfer, and only it, writes the
           reservation's own pages (positions >= cached_tokens) and its slot; the written
           token ranges of each layer are recorded.
COMMITTED  commit() found every piece (a lost or mismatched chunk is never decoded from) and
           moved the request into the batch; the state at the prompt's end is published to
           the prefix cache here, and only here, so only state that passed bind's check ever
           reaches it. Tokens queue on the request's stream. No writes.
STREAMING  Committed, and a Generate call attached and streams the tokens. (A Generate that
           attaches earlier is recorded; commit then goes straight to STREAMING.)
ENDED      Terminal: finished, released, expired, reclaimed, failed, or aborted (`ended`
           says why). Open room went back to the allocator; a running request was aborted.

Who writes the reservation's memory, and when: only in RECEIVING, only the bound transfer,
only its own pages and slot. Writes hold the reservation's lock through the copy, and the
move to ENDED takes the same lock, so pages go back to the allocator (and to another request)
only after the last write in flight finished: that is the fence.

Threads: bind and write run on a transfer thread, attach on a Generate thread; commit and
release change the engine and run on the engine's thread (EngineLoop hops there). Every
transition happens in a method of this class, under its lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import secrets
import sys
import threading
import time
import uuid
from array import array
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from enum import Enum
from typing import TYPE_CHECKING, Protocol

import torch

from baton.workers.engine.handoff import LayerState, StateKind, StateTransferError
from baton.workers.engine.runner import SampledToken
from baton.workers.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from baton.workers.engine.engine import Engine
    from baton.workers.engine.request import Sequence as EngineSequence

# Token ids travel as uint32 in the chain hash (and on the wire).
_TOKEN_ARRAY = "I" if array("I").itemsize == 4 else "L"


def prompt_chain_hash(token_ids: Sequence[int]) -> bytes:
    """The 32-byte hash that names a prompt: SHA-256 over its length (8 bytes, little
    endian) and every token id as a little-endian uint32, in order. A cryptographic hash
    (the prefix cache's xxh3 page chain is not collision resistant: a caller could craft a
    prompt whose page keys equal another's), so two prompts with one hash are the same
    prompt. The prefill worker computes it from the tokens it runs, the decode worker from
    the tokens it reserved for."""
    ids = array(_TOKEN_ARRAY, token_ids)
    if sys.byteorder == "big":
        ids.byteswap()
    h = hashlib.sha256(b"baton-prompt-v1\0")
    h.update(len(ids).to_bytes(8, "little"))
    h.update(ids.tobytes())
    return h.digest()


class ReservationState(str, Enum):
    """Where a reservation is in its life (see the module docstring)."""

    OPEN = "open"
    RECEIVING = "receiving"
    COMMITTED = "committed"
    STREAMING = "streaming"
    ENDED = "ended"


class EndReason(str, Enum):
    """Why a reservation ended."""

    FINISHED = "finished"
    """Its request ran to its end (or was aborted inside the engine)."""
    RELEASED = "released"
    """Release, or the Generate call ended (the router gave up: its client left)."""
    ATTACH_EXPIRED = "attach_expired"
    """No Generate call attached to it in time (a router that went away, or a flood)."""
    RECLAIMED = "reclaimed"
    """Unattached, and its room was taken back for another reservation."""
    DEADLINE = "deadline"
    """The request's deadline passed."""
    TRANSFER_FAILED = "transfer_failed"
    """Its state transfer failed (refused handshake, bad chunk, late, sender gone)."""
    SHUTDOWN = "shutdown"
    """The engine stopped."""


class Mirror(Protocol):
    """Replays a reservation's bind and writes on the other ranks of an expert-parallel
    replica (EngineLoop). `replica_lock` orders them with the steps: it is taken before the
    reservation's own lock, as the loop thread takes it before committing or releasing."""

    replica_lock: contextlib.AbstractContextManager

    def replay_reservation(self, reservation: DecodeReservation, op: str,
                           args: tuple) -> None: ...


class Driver(Protocol):
    """Runs a reservation's engine-side transitions on the engine's thread (EngineLoop)."""

    def commit(self, reservation: DecodeReservation, first_token: int,
               sampling: SamplingParams | None = None, logprob: float | None = None,
               top_logprobs: list[tuple[int, float]] | None = None) -> object: ...

    def release(self, reservation: DecodeReservation, reason: EndReason = EndReason.RELEASED,
                message: str = "") -> Future: ...


class BindingRefused(StateTransferError):
    """A handshake's token or chain hash is not the reservation's: nothing was written."""


def _covers(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    reach = start
    for a, b in sorted(ranges):
        if a > reach:
            break
        reach = max(reach, b)
    return reach >= end


class DecodeReservation:
    """Room for one request in a decode engine; see the module docstring for its states."""

    def __init__(self, engine: Engine, seq: EngineSequence, n_tokens: int,
                 cached_tokens: int = 0, local: bool = False) -> None:
        self._engine = engine
        self._seq = seq
        self.request_id = seq.request_id
        self.reservation_id = uuid.uuid4().hex
        self.n_tokens = n_tokens
        self.cached_tokens = cached_tokens
        """Prompt tokens [0, cached_tokens) this engine already holds; state arrives for the
        rest (or, with local_prefill, the engine computes it)."""
        self.local_prefill = local
        self.chain_hash = prompt_chain_hash(seq.request.prompt_ids)
        self.token = secrets.token_bytes(16).hex()
        """Unguessable (128 random bits); only this worker's Reserve answer tells it."""
        self.state = ReservationState.COMMITTED if local else ReservationState.OPEN
        self.ended: EndReason | None = None
        self.end_message = ""
        self.attached = False
        """A Generate call took this reservation (one stream per reservation)."""
        self.stream = None
        """The request's RequestStream (EngineLoop sets it at commit, or at reserve for a
        local prefill); None when the engine is driven directly."""
        self.deadline = float("inf")
        """The request's deadline (time.time()); the decode servicer sets it."""
        self.reserved_at = time.monotonic()
        self.sender_cached_tokens = 0
        """Prompt tokens the prefill worker's prefix cache served (its transfer says)."""
        self.driver: Driver | None = None
        """Set by EngineLoop: commit and release run on its thread (complete / fail)."""
        self.on_end: Callable[[DecodeReservation], None] | None = None
        """Called once, on the thread that ended it, after the move to ENDED (the decode
        servicer forgets the reservation there)."""
        self.transfer_error: Exception | None = None
        """Why its transfer failed (ended TRANSFER_FAILED): a TransferError."""
        self.mirror: Mirror | None = None
        """Set by an expert-parallel EngineLoop: replays bind and write on the other ranks
        (before the local change, once its checks passed)."""
        self._lock = threading.Lock()
        self._started = threading.Event()
        if local:
            self._started.set()
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

    def __repr__(self) -> str:
        return (f"DecodeReservation({self.reservation_id[:8]} of {self.request_id!r}, "
                f"{self.state.value})")

    # ---- OPEN -> RECEIVING (a transfer thread) -------------------------------------------

    def bind(self, token: str, chain_hash: bytes) -> None:
        """Accepts the transfer that presents this reservation's token and prompt chain hash
        (OPEN -> RECEIVING); BindingRefused, with nothing written, otherwise."""
        with self._replica_lock(), self._lock:
            if self.state is not ReservationState.OPEN:
                raise BindingRefused(f"reservation of {self.request_id!r} is "
                                     f"{self.state.value}: it takes no transfer")
            if not hmac.compare_digest(str(token).encode(), self.token.encode()):
                raise BindingRefused(f"reservation of {self.request_id!r}: the transfer "
                                     "presents another reservation's token (or none)")
            if not hmac.compare_digest(bytes(chain_hash), self.chain_hash):
                raise BindingRefused(
                    f"reservation of {self.request_id!r}: the sender prefilled another prompt "
                    f"(chain hash {bytes(chain_hash).hex()[:16]}..., the reservation holds "
                    f"{self.chain_hash.hex()[:16]}...)")
            if self.mirror is not None:
                self.mirror.replay_reservation(self, "bind", ())
            self.state = ReservationState.RECEIVING

    # ---- RECEIVING: writes (the bound transfer's thread) ----------------------------------

    def write(self, state: LayerState) -> None:
        """Copy one piece of state into the reserved pages / slot (RECEIVING only)."""
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
        # The lock is held through the copy: the move to ENDED waits for it, so pages are
        # never freed (and handed to another request) while a write into them is in flight.
        with self._replica_lock(), self._lock:
            if self.state is not ReservationState.RECEIVING:
                raise StateTransferError(
                    f"reservation of {self.request_id!r} is {self.state.value}: it takes "
                    "writes only from the transfer it bound")
            if self.mirror is not None:
                self.mirror.replay_reservation(self, "write", (state,))
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

    def _replica_lock(self) -> contextlib.AbstractContextManager:
        return self.mirror.replica_lock if self.mirror is not None else contextlib.nullcontext()

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

    # ---- RECEIVING -> COMMITTED (the engine's thread) --------------------------------------

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
            if self.state is not ReservationState.RECEIVING:
                raise StateTransferError(f"reservation of {self.request_id!r} is "
                                         f"{self.state.value}: only a bound transfer commits")
            missing = self._missing()
            if missing:
                raise StateTransferError(
                    f"reservation of {self.request_id!r} is incomplete: missing "
                    + ", ".join(missing[:5])
                    + (" ..." if len(missing) > 5 else "")
                )
            self.state = (ReservationState.STREAMING if self.attached
                          else ReservationState.COMMITTED)
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

    # ---- the transfer's view (ReceiveTarget: bind, write, complete, fail) -----------------

    def complete(self, first_token, cached_tokens: int) -> None:
        """Every state arrived (a transfer's FirstToken): commit, on the engine's thread."""
        self.sender_cached_tokens = cached_tokens
        wants = self._seq.request.sampling.wants_logprobs
        args = (first_token.token_id, None, first_token.logprob if wants else None,
                list(first_token.top_logprobs))
        if self.driver is not None:
            self.driver.commit(self, *args)
        else:
            self.commit(*args)

    def fail(self, error: Exception) -> None:
        """The transfer failed: end the reservation and free its room."""
        self.transfer_error = error
        if self.driver is not None:
            self.driver.release(self, EndReason.TRANSFER_FAILED, str(error))
        else:
            self.release(EndReason.TRANSFER_FAILED, str(error))

    def mark_started(self) -> None:
        """The request's stream is in place (EngineLoop, after commit): wakes wait_started."""
        self._started.set()

    # ---- attach (a Generate thread) -------------------------------------------------------

    def attach(self) -> bool:
        """A Generate call takes the reservation; False if it ended or another call has it."""
        with self._lock:
            if self.attached or self.state is ReservationState.ENDED:
                return False
            self.attached = True
            if self.state is ReservationState.COMMITTED:
                self.state = ReservationState.STREAMING
            return True

    def wait_started(self, timeout: float | None = None) -> bool:
        """Blocks until the request runs (committed) or the reservation ended."""
        return self._started.wait(timeout)

    # ---- -> ENDED (the engine's thread) -----------------------------------------------------

    def end(self, reason: EndReason, message: str = "") -> ReservationState | None:
        """Moves to ENDED (after any write in flight) and records why; returns the state it
        left, None if it had already ended. Frees nothing: release() does."""
        with self._lock:
            previous = self.state
            if previous is ReservationState.ENDED:
                return None
            self.state = ReservationState.ENDED
            self.ended, self.end_message = reason, message
        self._started.set()
        if self.on_end is not None:
            self.on_end(self)
        return previous

    def release(self, reason: EndReason = EndReason.RELEASED, message: str = "") -> None:
        """Ends the reservation and frees what it holds; idempotent. Room not yet committed
        goes back to the allocator; a committed request is aborted (its stream ends with
        finish_reason "abort"; a finished one is left as it is)."""
        previous = self.end(reason, message)
        if previous in (ReservationState.OPEN, ReservationState.RECEIVING):
            self._engine._end_reservation(self)
            self._engine._release_reserved(self._seq)
        elif previous in (ReservationState.COMMITTED, ReservationState.STREAMING):
            self._engine.abort(self.request_id)
