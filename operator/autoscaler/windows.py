"""SLO attainment in every 5-minute window of a run, not only over the whole trace.

A day's average hides the minutes at a surge's onset when the latency is several times its
target; a user pages someone for those. A window holds the requests that arrived within it
(so a request counts once per window it arrived in, whatever its latency); windows end every
STEP_SECONDS from WINDOW_SECONDS to the trace's end, and the worst is the lowest share of
requests within the target in any of them.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["WINDOW_SECONDS", "STEP_SECONDS", "window_attainment", "worst"]

WINDOW_SECONDS = 300.0
STEP_SECONDS = 10.0


def window_attainment(arrivals: np.ndarray, met: np.ndarray, duration: float,
                      width: float = WINDOW_SECONDS,
                      step: float = STEP_SECONDS) -> tuple[np.ndarray, np.ndarray]:
    """(window ends, share of the requests arriving in [end - width, end) that met their
    target; NaN where none arrived). arrivals: sorted arrival times; met: per request."""
    if not (width > 0 and step > 0):
        raise ValueError(f"width and step must be > 0, got {width!r} and {step!r}")
    if len(arrivals) != len(met):
        raise ValueError(f"arrivals ({len(arrivals)}) and met ({len(met)}) differ in length")
    width = min(width, duration) if duration > 0 else width
    ends = np.arange(width, duration + 1e-9, step)
    if ends.size == 0 or ends[-1] < duration - 1e-9:
        ends = np.append(ends, max(duration, width))
    passed = np.concatenate([[0], np.cumsum(np.asarray(met, dtype=np.int64))])
    lo = np.searchsorted(arrivals, ends - width, side="left")
    hi = np.searchsorted(arrivals, ends, side="left")
    # the last window also holds a request arriving exactly at the trace's end
    hi[-1] = np.searchsorted(arrivals, ends[-1], side="right")
    counts = hi - lo
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(counts > 0, (passed[hi] - passed[lo]) / np.maximum(counts, 1), np.nan)
    return ends, share


def worst(share: np.ndarray) -> float:
    """The lowest share over windows with requests (NaN when no window has any)."""
    valid = share[~np.isnan(share)]
    return float(valid.min()) if valid.size else math.nan
