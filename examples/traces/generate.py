"""Writes the example request traces `baton simulate` replays (CSV: time_s, prompt_tokens,
output_tokens). Deterministic: the same seed gives the same files.

    python examples/traces/generate.py [--out-dir examples/traces] [--seed 20261123]

Arrivals are a non-homogeneous Poisson process with rate rate(t) (requests/s), drawn second
by second. Request sizes are lognormal, clipped: prompts median 6000 tokens (sigma 0.5,
16..32000), outputs median 2500 tokens (sigma 0.5, 2..16000): long contexts and long
answers, the workload this model family is built for, so decode carries as much of the
fleet as prefill.

- surging.csv (60 min): 10 req/s for 10 min, a 15 min linear ramp to 30 req/s (3x), 5 min
  there, a 15 min ramp back, 15 min at 10 req/s.
- surges.csv (180 min): a surge every hour on a 10 req/s base, each an 8 min linear ramp to
  30 req/s (3x), 8 min there and an 8 min ramp back, starting at minutes 20, 80 and 140, so
  36 min of calm lie between them (20 before the first, 16 after the last): the autoscaler
  must have capacity ready at each onset, and give it back in between.
- diurnal.csv (60 min, a day compressed 24x): 3 req/s at the trough to 30 req/s at the peak
  (10x), rate(t) = trough + (peak - trough) * ((1 - cos(2 pi t / 60 min)) / 2) ** 2, so the
  peak is narrower than the trough, as in daily traffic.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import numpy as np

SEED = 20261123
PROMPT_MEDIAN, PROMPT_SIGMA, PROMPT_RANGE = 6000.0, 0.5, (16, 32000)
OUTPUT_MEDIAN, OUTPUT_SIGMA, OUTPUT_RANGE = 2500.0, 0.5, (2, 16000)


def surging_rate(t: float) -> float:
    base, peak = 10.0, 30.0
    edges = [0.0, 600.0, 1500.0, 1800.0, 2700.0, 3600.0]  # flat, up, top, down, flat
    if t < edges[1]:
        return base
    if t < edges[2]:
        return base + (peak - base) * (t - edges[1]) / (edges[2] - edges[1])
    if t < edges[3]:
        return peak
    if t < edges[4]:
        return peak - (peak - base) * (t - edges[3]) / (edges[4] - edges[3])
    return base


SURGE_STARTS = (1200.0, 4800.0, 8400.0)
SURGE_RAMP, SURGE_TOP = 480.0, 480.0


def surges_rate(t: float) -> float:
    base, peak = 10.0, 30.0
    for start in SURGE_STARTS:
        into = t - start
        if 0.0 <= into < SURGE_RAMP:
            return base + (peak - base) * into / SURGE_RAMP
        if SURGE_RAMP <= into < SURGE_RAMP + SURGE_TOP:
            return peak
        if SURGE_RAMP + SURGE_TOP <= into < 2 * SURGE_RAMP + SURGE_TOP:
            return peak - (peak - base) * (into - SURGE_RAMP - SURGE_TOP) / SURGE_RAMP
    return base


def diurnal_rate(t: float) -> float:
    trough, peak, period = 3.0, 30.0, 3600.0
    return trough + (peak - trough) * ((1.0 - math.cos(2.0 * math.pi * t / period)) / 2.0) ** 2


# name -> (rate, seconds, seed offset); the offsets keep each trace's draws fixed when
# traces are added
TRACES = {"diurnal": (diurnal_rate, 3600, 0), "surging": (surging_rate, 3600, 1),
          "surges": (surges_rate, 10800, 2)}


def generate(rate, duration_s: int, rng: np.random.Generator) -> np.ndarray:
    """Rows (time_s, prompt_tokens, output_tokens) sorted by time."""
    times = []
    for second in range(duration_s):
        # the rate at the middle of each second; arrivals uniform within it
        count = rng.poisson(rate(second + 0.5))
        times.extend(second + np.sort(rng.random(count)))
    n = len(times)
    prompts = np.clip(np.rint(rng.lognormal(math.log(PROMPT_MEDIAN), PROMPT_SIGMA, n)),
                      *PROMPT_RANGE).astype(np.int64)
    outputs = np.clip(np.rint(rng.lognormal(math.log(OUTPUT_MEDIAN), OUTPUT_SIGMA, n)),
                      *OUTPUT_RANGE).astype(np.int64)
    return np.array(times), prompts, outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, (rate, duration, offset) in TRACES.items():
        rng = np.random.default_rng(args.seed + offset)
        times, prompts, outputs = generate(rate, duration, rng)
        path = args.out_dir / f"{name}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["time_s", "prompt_tokens", "output_tokens"])
            writer.writerows(zip((f"{t:.3f}" for t in times), prompts.tolist(),
                                 outputs.tolist()))
        print(f"wrote {path}: {len(times)} requests over {duration} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
