"""How much work one replica of the reference pool (relativeSpeed 1) does.

The policy turns demand (prompt tokens/s, concurrent sequences) into replicas with it, and
`baton simulate` runs its queueing model of the pools on it. The JSON form:

    {"prefill_tokens_per_second": 16000,
     "decode_step_seconds": {"1": 0.004, "8": 0.0074, "32": 0.0139, "128": 0.0225},
     "max_decode_batch": 128}

A replica of a pool with relativeSpeed s prefills s times as many tokens per second, takes
step/s per decode step at the same batch size and holds s times the sequences (a faster GPU
generation also has more memory: B200 192 GB against H100 80 GB).

DEFAULT_PROFILE: one H100 (80 GB HBM3) running a Nemotron 3 Nano-like model (30B total,
~3.2B active parameters per token, W4A16 weights on Hopper). Until benchmarks/ measure it on
the GPU, the numbers are a roofline estimate at stated efficiencies, not a measurement:
- prefill: 2 * 3.2e9 FLOP per token; 989 TFLOP/s dense BF16 at ~10% end-to-end efficiency
  (W4A16 dequantization, Mamba scans, MoE routing, state transfer) gives ~16k tokens/s.
- decode step at batch b: weight bytes read (~1.2e9 non-expert parameters plus the share
  of the ~28.8e9 expert parameters (128 experts, top-6) the batch touches, 1-(1-6/128)^b, at
  0.56 bytes per parameter) plus the Mamba state read and written per sequence (~47 MiB
  fp32 each way), at ~45% of 3.35 TB/s, plus ~3 ms of launch and scheduling overhead per
  step: 4.0, 7.4, 13.9 and 22.5 ms at batch 1, 8, 32 and 128 (~250 tokens/s for a single
  stream).
- max_decode_batch: 128 sequences fit beside the weights (~18 GB) with their Mamba state
  (47 MiB each) and 8k tokens of KV each (~6 KiB per token).
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ReplicaProfile", "DEFAULT_PROFILE", "load_profile"]


@dataclass(frozen=True)
class ReplicaProfile:
    """Throughput of one replica of the reference pool (relativeSpeed 1)."""

    prefill_tokens_per_second: float
    """Prompt tokens one replica prefills per second when busy."""
    decode_step_seconds: tuple[tuple[int, float], ...]
    """(batch size, seconds per decode step), increasing batch sizes; linear in between."""
    max_decode_batch: int
    """Most sequences one reference decode replica runs at once (memory bound)."""

    def __post_init__(self) -> None:
        if not (self.prefill_tokens_per_second > 0 and math.isfinite(
                self.prefill_tokens_per_second)):
            raise ValueError(f"prefill_tokens_per_second must be a finite number > 0, got "
                             f"{self.prefill_tokens_per_second!r}")
        points = self.decode_step_seconds
        if not points:
            raise ValueError("decode_step_seconds must hold at least one batch size")
        batches = [b for b, _ in points]
        if batches != sorted(set(batches)) or batches[0] < 1:
            raise ValueError(f"decode_step_seconds batch sizes must be distinct integers >= 1, "
                             f"got {batches}")
        steps = [s for _, s in points]
        if any(not (s > 0 and math.isfinite(s)) for s in steps):
            raise ValueError(f"decode_step_seconds values must be finite numbers > 0, got "
                             f"{steps}")
        if any(b > a for a, b in zip(steps[1:], steps[:-1])):
            raise ValueError(f"decode_step_seconds must not decrease with batch size, got "
                             f"{dict(points)}")
        if not isinstance(self.max_decode_batch, int) or self.max_decode_batch < 1:
            raise ValueError(f"max_decode_batch must be an integer >= 1, got "
                             f"{self.max_decode_batch!r}")

    @classmethod
    def from_dict(cls, obj: Any) -> ReplicaProfile:
        """Parses the JSON form (keys above); extra keys such as "source" are ignored."""
        if not isinstance(obj, dict):
            raise ValueError(f"a profile must be a JSON object, got {type(obj).__name__}")
        for key in ("prefill_tokens_per_second", "decode_step_seconds", "max_decode_batch"):
            if key not in obj:
                raise ValueError(f"profile: {key} is required")
        steps = obj["decode_step_seconds"]
        if not isinstance(steps, dict):
            raise ValueError(f"profile: decode_step_seconds must be an object of "
                             f"batch size -> seconds, got {steps!r}")
        points = []
        for batch, seconds in steps.items():
            try:
                points.append((int(batch), float(seconds)))
            except (TypeError, ValueError):
                raise ValueError(f"profile: decode_step_seconds[{batch!r}] must map an integer "
                                 f"batch size to seconds, got {seconds!r}") from None
        max_batch = obj["max_decode_batch"]
        if isinstance(max_batch, bool) or not isinstance(max_batch, int):
            raise ValueError(f"profile: max_decode_batch must be an integer, got {max_batch!r}")
        try:
            tokens = float(obj["prefill_tokens_per_second"])
        except (TypeError, ValueError):
            raise ValueError(f"profile: prefill_tokens_per_second must be a number, got "
                             f"{obj['prefill_tokens_per_second']!r}") from None
        return cls(prefill_tokens_per_second=tokens,
                   decode_step_seconds=tuple(sorted(points)), max_decode_batch=max_batch)

    def to_dict(self) -> dict:
        return {"prefill_tokens_per_second": self.prefill_tokens_per_second,
                "decode_step_seconds": {str(b): s for b, s in self.decode_step_seconds},
                "max_decode_batch": self.max_decode_batch}

    def decode_step(self, batch: float, relative_speed: float = 1.0) -> float:
        """Seconds per decode step at `batch` sequences on a replica of that speed.

        Linear between the measured batch sizes; below the first it is the first point's
        time (a step never gets cheaper than one sequence), above the last it extends the
        last segment's slope.
        """
        points = self.decode_step_seconds
        batches = [b for b, _ in points]
        if batch <= batches[0] or len(points) == 1:
            base = points[0][1] if batch <= batches[0] else points[-1][1]
            return base / relative_speed
        i = bisect.bisect_left(batches, batch)
        if i == len(points):
            (b0, s0), (b1, s1) = points[-2], points[-1]
        else:
            (b0, s0), (b1, s1) = points[i - 1], points[i]
        return (s0 + (s1 - s0) * (batch - b0) / (b1 - b0)) / relative_speed

    def decode_batch_limit(self, relative_speed: float = 1.0,
                           max_concurrency: int | None = None) -> int:
        """Most sequences one replica of that speed runs at once: the profile's max batch
        scaled by relativeSpeed (a faster GPU generation also has more memory for state),
        capped by the spec's maxConcurrency."""
        limit = max(1, math.floor(self.max_decode_batch * relative_speed + 1e-9))
        return limit if max_concurrency is None else min(limit, max_concurrency)

    def decode_batch_within(self, step_limit: float, relative_speed: float = 1.0,
                            max_concurrency: int | None = None) -> int:
        """Largest batch whose step time stays within `step_limit` seconds (0 if none does),
        at most decode_batch_limit()."""
        cap = self.decode_batch_limit(relative_speed, max_concurrency)
        if self.decode_step(1, relative_speed) > step_limit:
            return 0
        lo, hi = 1, cap
        while lo < hi:  # the step time does not decrease with the batch: bisect
            mid = (lo + hi + 1) // 2
            if self.decode_step(mid, relative_speed) <= step_limit:
                lo = mid
            else:
                hi = mid - 1
        return lo


DEFAULT_PROFILE = ReplicaProfile(
    prefill_tokens_per_second=16000.0,
    decode_step_seconds=((1, 0.0040), (8, 0.0074), (32, 0.0139), (128, 0.0225)),
    max_decode_batch=128,
)


def load_profile(path: str | Path | None) -> ReplicaProfile:
    """The profile in a JSON file, or DEFAULT_PROFILE when path is None."""
    if path is None:
        return DEFAULT_PROFILE
    try:
        obj = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"profile {path}: not valid JSON ({e})") from None
    try:
        return ReplicaProfile.from_dict(obj)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
