"""baton.workers.engine: continuous batching, sampling, speculative decoding, state handoff.

    engine = Engine(model, EngineConfig(num_pages=..., max_batch_tokens=...), tokenizer)
    engine.add_request(Request("r1", prompt_ids, SamplingParams(max_tokens=32)))
    while engine.has_work():
        for event in engine.step(): ...            # TokenEvent per request and step
    loop = EngineLoop(engine); stream = loop.submit(request)   # thread-safe wrapper

Modules: engine (schedule -> execute -> update), scheduler (StepPlan, admission with prefix-cache
hits, preemption), runner (forward passes, MTP drafting and verification, whole-prompt hits),
sampling (counter-based seeded sampling), logits (what changes a row's logits before sampling:
penalties.py, grammar.py with llguidance), allocator (refcounted KV pages with an LRU of cached
ones, state slots), prefix_cache (the page trie and the Mamba snapshot pool), snapshots (when
pages are published and snapshots taken), sizing (how many pages, slots and snapshots),
handoff + reservation (prefill on one engine, decode on another; DecodeReservation is the
reservation's state machine), loop (EngineLoop,
RequestStream), config (EngineConfig, EngineStats), request (Request, TokenEvent,
per-sequence state). Text (tokenizers, chat templates, detokenizer, stop strings) is
baton.workers.text, which imports no torch.
"""

from baton.workers.engine.config import EngineConfig, EngineStats, StepTimings
from baton.workers.engine.engine import Engine
from baton.workers.engine.handoff import (
    CacheFull,
    LayerState,
    PrefillAborted,
    PrefillResult,
    PrefillSink,
    StateKind,
    StateTransferError,
)
from baton.workers.engine.loop import EngineDraining, EngineLoop, RequestStream
from baton.workers.engine.request import Request, TokenEvent
from baton.workers.engine.reservation import (
    BindingRefused,
    DecodeReservation,
    EndReason,
    ReservationState,
    prompt_chain_hash,
)
from baton.workers.engine.sampling import SamplingParams

__all__ = [
    "BindingRefused",
    "CacheFull",
    "Engine",
    "DecodeReservation",
    "EndReason",
    "EngineConfig",
    "EngineDraining",
    "EngineLoop",
    "EngineStats",
    "LayerState",
    "PrefillAborted",
    "PrefillResult",
    "PrefillSink",
    "Request",
    "RequestStream",
    "ReservationState",
    "SamplingParams",
    "StateKind",
    "StateTransferError",
    "StepTimings",
    "TokenEvent",
    "prompt_chain_hash",
]
