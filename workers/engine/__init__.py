"""baton.workers.engine: continuous batching, sampling, speculative decoding, state handoff."""

from baton.workers.engine.config import EngineConfig, EngineStats, StepTimings
from baton.workers.engine.handoff import (
    CacheFull,
    LayerState,
    PrefillResult,
    PrefillSink,
    StateKind,
)
from baton.workers.engine.request import Request, TokenEvent
from baton.workers.engine.sampling import SamplingParams

__all__ = [
    "CacheFull",
    "EngineConfig",
    "EngineStats",
    "LayerState",
    "PrefillResult",
    "PrefillSink",
    "Request",
    "SamplingParams",
    "StateKind",
    "StepTimings",
    "TokenEvent",
]
