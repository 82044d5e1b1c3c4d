"""A progress bar for the long-running commands (`baton quantize`, the demo model's training).

On a terminal it redraws one line; into a file or pipe (a log) it writes a line at most every
`interval` seconds and at the end, so a log stays readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """`done/total` with a bar, the rate, the time left and a few named figures."""

    def __init__(self, total: int, description: str, unit: str = "it",
                 stream: TextIO | None = None, interval: float = 10.0, width: int = 24):
        if total < 0:
            raise ValueError(f"total: must be >= 0, got {total}")
        self.total, self.description, self.unit = total, description, unit
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.1 if self.tty else interval
        self.width = width
        self.done = 0
        self.figures: dict[str, str] = {}
        self.started = time.monotonic()
        self._last_draw = -float("inf")
        self._drawn: tuple | None = None

    def update(self, n: int = 1, **figures: float | str) -> None:
        """Counts n more units done; figures (e.g. loss=2.31) are shown beside the bar."""
        self.done = min(self.total, self.done + n)
        for name, value in figures.items():
            self.figures[name] = f"{value:.4g}" if isinstance(value, float) else str(value)
        now = time.monotonic()
        if self.done >= self.total or now - self._last_draw >= self.interval:
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = now - self.started
        fraction = self.done / self.total if self.total else 1.0
        filled = int(round(fraction * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = _clock(left) if left != float("inf") else "?"
        extra = " ".join(f"{k}={v}" for k, v in self.figures.items())
        return (f"{self.description} [{bar}] {self.done}/{self.total} {self.unit} "
                f"{100 * fraction:.0f}% {_clock(elapsed)}<{eta} {rate:.3g} {self.unit}/s "
                f"{extra}").rstrip()

    def _draw(self, now: float) -> None:
        self._last_draw = now
        self._drawn = (self.done, tuple(self.figures.items()))
        text = self.line(now)
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Draws the final state (and ends the terminal line)."""
        if self._drawn != (self.done, tuple(self.figures.items())):
            self._draw(time.monotonic())
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"
