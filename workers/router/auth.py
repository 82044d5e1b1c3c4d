"""Optional API keys: a file of keys, one per line (a mounted Kubernetes Secret)."""

from __future__ import annotations

import hashlib
import logging
import os

log = logging.getLogger("baton.router")


class ApiKeys:
    """Keys from a file (one per line, a mounted Secret), re-read when the file changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._mtime: float | None = None
        self._keys: frozenset[bytes] = frozenset()
        self._load()

    def _load(self) -> None:
        mtime = os.stat(self.path).st_mtime
        if mtime != self._mtime:
            with open(self.path, encoding="utf-8") as f:
                keys = {line.strip() for line in f}
            keys.discard("")
            keys = {k for k in keys if not k.startswith("#")}
            if not keys:
                raise ValueError(f"apiKeysFile {self.path!r} holds no keys")
            self._keys = frozenset(_digest(k) for k in keys)
            self._mtime = mtime

    def allows(self, key: str) -> bool:
        try:
            self._load()
        except (OSError, ValueError) as exc:
            # A Secret being rotated can vanish for a moment: keep the last good keys.
            log.warning("kept the previous API keys: re-reading %s failed: %s", self.path, exc)
        # Digests, not the keys, are compared: how long a lookup takes says nothing about
        # how much of a guessed key was right.
        return _digest(key) in self._keys


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()
