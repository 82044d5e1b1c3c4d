"""The arrival rate's trend: a slope counts only when it stands clear of the rate windows'
noise, of a dip's recovery, and of a rise that has stopped."""

from __future__ import annotations

import numpy as np

from baton.operator.autoscaler.trend import TREND_INTERVALS, onset_slope, ramp_slope, rising_slope

W, STEP = 60.0, 30.0


def windowed(rate_of, seconds: float, rng) -> list[tuple[float, float]]:
    """(time, arrivals over the last W seconds / W) every STEP seconds of a Poisson process
    with rate rate_of(t), drawn second by second."""
    counts = rng.poisson([rate_of(s + 0.5) for s in range(int(seconds))])
    cum = np.concatenate([[0], np.cumsum(counts)])
    return [(t, (cum[int(t)] - cum[int(t - W)]) / W)
            for t in np.arange(W, seconds + 1e-9, STEP)]


def slopes(points) -> list[float]:
    return [rising_slope(points[:k], t, rate, W, STEP) for k, (t, rate) in enumerate(points)]


def test_a_flat_load_never_rises_whatever_its_noise():
    rng = np.random.default_rng(1)
    for level in (3.0, 10.0, 30.0, 100.0):
        points = windowed(lambda t, level=level: level, 3 * 3600, rng)
        assert max(slopes(points)) == 0.0, level


def test_a_ramp_is_seen_within_a_few_intervals_at_its_slope():
    rng = np.random.default_rng(2)
    onset, per_second = 1800.0, 2.5 / 60  # 10 -> 30 req/s over 8 minutes

    def rate(t):
        return 10.0 + per_second * min(max(t - onset, 0.0), 480.0)
    points = windowed(rate, onset + 480, rng)
    found = slopes(points)
    first = next(t for (t, _), s in zip(points, found) if s > 0)
    # the rate window is a minute old and 60 s in it holds a quarter of the ramp's first
    # minute: seen 1.5 to 3.5 minutes after the onset
    assert onset + 60 <= first <= onset + 210
    late = [s for (t, _), s in zip(points, found) if t > onset + 300]
    # the steepest of several noisy fits: never below the ramp, at most half again above it
    # (the margin that has capacity ready at an onset; a mean of the fits lags there)
    assert per_second * 0.9 <= np.median(late) <= per_second * 1.5
    assert not any(s > 0 for (t, _), s in zip(points, found) if t < onset)


def test_a_dip_and_its_recovery_and_a_stopped_rise_are_no_rise():
    level = [(t, 10.0) for t in np.arange(0.0, 600.0, STEP)]
    dip = level + [(600.0, 8.6), (630.0, 9.5), (660.0, 10.4), (690.0, 10.8)]
    assert slopes(dip)[-1] == 0.0
    # a clear rise that has stopped over the last two intervals is over
    rise = level + [(600.0 + STEP * k, 10.0 + 1.5 * k) for k in range(1, 7)]
    assert slopes(rise)[-1] > 0
    stopped = rise + [(810.0, 19.0), (840.0, 18.9)]
    assert slopes(stopped)[-1] == 0.0


def test_too_little_history_has_no_slope():
    span = min(TREND_INTERVALS) * STEP
    assert rising_slope([], 0.0, 20.0, W, STEP) == 0.0
    short = [(0.0, 10.0)]
    assert rising_slope(short, span - STEP, 20.0, W, STEP) == 0.0


SHORT = 30.0


def detector_series(rate_of, seconds: float, seed: int) -> list[tuple[float, float]]:
    """ramp_slope, as the policy calls it, every STEP seconds of a Poisson process drawn
    second by second: the long window's rates, the decisions' history, the short window."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson([rate_of(s + 0.5) for s in range(int(seconds))])
    cum = np.concatenate([[0], np.cumsum(counts)])
    history, out = [], []
    for t in np.arange(W, seconds + 1e-9, STEP):
        long_rate = (cum[int(t)] - cum[int(t - W)]) / W
        short_rate = (cum[int(t)] - cum[int(t - SHORT)]) / SHORT
        out.append((t, ramp_slope(history, t, long_rate, short_rate, W, SHORT, STEP)))
        history.append((t, long_rate))
    return out


def test_noise_at_a_flat_rate_triggers_nothing():
    for seed, level in enumerate((2.0, 5.0, 20.0, 60.0, 200.0) * 4):
        found = detector_series(lambda t, level=level: level, 3600, seed)
        assert max(s for _, s in found) == 0.0, (seed, level)


def test_a_ramp_is_seen_within_two_intervals():
    # ramps whose rise over two intervals stands clear of the short window's noise
    # (15 s x slope > ONSET_Z sd): 1.5-4x over 1-4 minutes from 5-60 req/s
    onset = 900.0
    for seed, (level, factor, ramp) in enumerate(
            [(20.0, 3.0, 180.0), (10.0, 4.0, 120.0), (60.0, 2.0, 120.0), (40.0, 1.5, 60.0),
             (5.0, 4.0, 60.0), (30.0, 3.0, 240.0)] * 3):
        per_second = level * (factor - 1) / ramp

        def rate(t, level=level, per_second=per_second, ramp=ramp):
            return level + per_second * min(max(t - onset, 0.0), ramp)
        found = detector_series(rate, onset + ramp + 120, seed)
        assert not any(s > 0 for t, s in found if t <= onset), (seed, level, factor, ramp)
        first = next(t for t, s in found if s > 0)
        assert first <= onset + 2 * STEP, (seed, level, factor, ramp, first - onset)


def test_onset_slope_reads_the_gap_between_the_windows():
    # a linear ramp of 0.2 req/s per second: the short window's mean is 15 s younger
    assert abs(onset_slope(23.0, 20.0, SHORT, W) - 0.2) < 1e-9
    assert onset_slope(20.5, 20.0, SHORT, W) == 0.0  # within the noise
    assert onset_slope(None, 20.0, SHORT, W) == 0.0
    assert onset_slope(30.0, 20.0, W, W) == 0.0  # no shorter window, no reading
