"""Whether the arrival rate rises clearly, and how fast: the policy's leading signal.

A rate measured over a window of w seconds carries Poisson noise; a slope fitted to a few
such rates is noisy too, and a dip followed by its recovery looks like a rise. A slope counts
only when it stands clear of all three (rising_slope), so a flat load projects nothing and
noise never scales a fleet.
"""

from __future__ import annotations

import math

__all__ = ["ramp_slope", "rising_slope", "onset_slope", "TREND_INTERVALS", "TREND_MIN_RISE",
           "TREND_Z", "ONSET_Z"]

TREND_INTERVALS = (2, 3, 4, 6, 8)
"""The spans, in decision intervals, the arrival rate's slope is fitted over."""
TREND_MIN_RISE = 0.05
"""A slope counts only when it rises by this share of the arrival rate per minute ..."""
TREND_Z = 3.0
"""... and its rise over the span by this many standard deviations of the rate windows'
Poisson noise."""
ONSET_Z = 4.0
"""onset_slope's bar, in standard deviations of the short window's noise."""
_EPS = 1e-9


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (time, value) points; 0 with fewer than three."""
    if len(points) < 3:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var <= 0:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var


def rising_slope(history: list[tuple[float, float]], now: float, arrivals: float,
                 window: float, interval: float) -> float:
    """The arrival rate's slope (requests/s per second) when it rises clearly, else 0.
    history: earlier (time, arrival rate) points, oldest first, one per decision interval.

    The slope is fitted over the last 2 to 8 intervals (TREND_INTERVALS); the steepest fit
    whose rise stands clear of the noise counts: short spans see an onset first, long ones a
    slow rise (their mean would overstate less at a surge's top, but lead less at its onset,
    where a missed minute costs the worst window). Noise: two rate windows `span` apart
    differ by the arrivals in two spans of min(span, window) seconds, Poisson:
    sd = sqrt(2 rate min(span, window)) / window. The rate must also stand clear of its
    level before the span, the mean of the windows before it (a recovery from a dip is no
    rise), and still rise over the shortest span (a rise that has stopped is over)."""
    clear, latest = [], None
    rate = max(arrivals, 1.0 / window)
    for intervals in TREND_INTERVALS:
        span = intervals * interval
        points = [(t, rate) for t, rate in history if now - t <= span + _EPS]
        if len(points) < 2 or now - points[0][0] < span - interval / 2:
            continue
        slope = _slope(points + [(now, arrivals)])
        if latest is None:
            latest = slope
        rise = slope * span
        noise = math.sqrt(2 * rate * min(span, window)) / window
        before = [(t, rate) for t, rate in history if now - t > span + _EPS]
        if before:
            # the level: the mean rate over the windows before the span, which cover
            # (their spread + one window) seconds
            level = sum(rate for _, rate in before) / len(before)
            covered = before[-1][0] - before[0][0] + window
            level_noise = math.sqrt(rate / window + rate / covered)
        else:
            level, level_noise = 0.0, 0.0
        if (rise > TREND_Z * noise and slope * 60 > TREND_MIN_RISE * arrivals
                and arrivals - level > TREND_Z * level_noise):
            clear.append(slope)
    if not clear or latest is None or latest <= 0:
        return 0.0
    return max(clear)


def onset_slope(short_rate: float | None, long_rate: float, short_window: float,
                long_window: float) -> float:
    """The arrival rate's slope (requests/s per second) seen from two windows that end now,
    or 0 when the short one does not stand clear of the long one.

    Both rates count the same arrivals; on a linear ramp of slope a the short window's mean
    is (long_window - short_window) / 2 seconds younger, so short - long = a (long_window -
    short_window) / 2. It reacts at the scrape resolution: one rate() over a short window of
    the router's counter sees a ramp's onset within one or two scrapes, where a slope fitted
    to decisions needs several. Noise: the short window's arrivals are part of the long
    one's, so var(short - long) = rate (1 / short_window - 1 / long_window) (Poisson); the
    difference must exceed ONSET_Z of it (one reading, taken every interval, stands alone:
    a stricter bar than the fits') and the rise TREND_MIN_RISE of the rate per minute."""
    if short_rate is None or not 0 < short_window < long_window:
        return 0.0
    rate = max(long_rate, 1.0 / long_window)
    noise = math.sqrt(rate * (1.0 / short_window - 1.0 / long_window))
    difference = short_rate - long_rate
    if difference <= ONSET_Z * noise:
        return 0.0
    slope = difference / ((long_window - short_window) / 2.0)
    if slope * 60 <= TREND_MIN_RISE * long_rate:
        return 0.0
    return slope


def ramp_slope(history: list[tuple[float, float]], now: float, arrivals: float,
               short_rate: float | None, window: float, short_window: float,
               interval: float) -> float:
    """The policy's ramp detector: the steeper of the slope fitted to the decisions' rates
    (rising_slope: slow rises, held over several intervals) and the slope between the short
    and the long window that end now (onset_slope: a ramp's onset within one or two
    scrapes); 0 when neither stands clear of the noise."""
    return max(rising_slope(history, now, arrivals, window, interval),
               onset_slope(short_rate, arrivals, short_window, window))
