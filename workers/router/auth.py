"""Optional API keys: a file of keys, one per line (a mounted Kubernetes Secret).

Each line is a key, optionally followed by the key's share of the router, as whitespace-
separated `name=value` options:

    sk-team-a weight=3 maxConcurrency=8
    sk-team-b

- `weight` (a number > 0, default 1): the key's share of admission when requests wait
  (admission.py: fair queueing between keys).
- `maxConcurrency` (an integer >= 1, default none): at most this many of the key's requests
  run at once; more wait in the queue.

A line of only a key (the original format) keeps working. Blank lines and lines starting with
`#` are skipped. Each key is its own tenant, named by a digest of the key (never the key).
"""

from __future__ import annotations

import hashlib
import logging
import os

from aiohttp import web

from baton.workers.router.admission import ANONYMOUS, Tenant

log = logging.getLogger("baton.router")

TENANT = web.RequestKey("tenant", Tenant)  # set by the router's authorization


def tenant_of(request: web.Request) -> Tenant:
    """The request's tenant: its API key's, or the one anonymous tenant without keys."""
    return request.get(TENANT, ANONYMOUS)


def cache_salt(tenant: Tenant, requested: str | None) -> bytes:
    """The workers' prefix-cache salt for a request: every API key's own (so cached_tokens
    and timing say nothing about another key's prompts), mixed with the request's cache_salt
    (vLLM's field); b"" (the shared cache) without keys and without cache_salt."""
    if not tenant.name and requested is None:
        return b""
    h = hashlib.sha256(b"baton-cache-salt-v1\0" + tenant.name.encode() + b"\0")
    if requested is not None:
        h.update(b"\1" + requested.encode("utf-8", "surrogatepass"))
    return h.digest()

_OPTIONS = ("weight", "maxConcurrency")


class ApiKeys:
    """Keys from a file (one per line, a mounted Secret), re-read when the file changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._mtime: float | None = None
        self._keys: dict[bytes, Tenant] = {}
        self._load()

    def _load(self) -> None:
        mtime = os.stat(self.path).st_mtime
        if mtime != self._mtime:
            with open(self.path, encoding="utf-8") as f:
                lines = f.read().splitlines()
            keys: dict[bytes, Tenant] = {}
            for number, line in enumerate(lines, 1):
                fields = line.split()
                if not fields or fields[0].startswith("#"):
                    continue
                digest = _digest(fields[0])
                keys[digest] = _tenant(digest, fields[1:], f"{self.path}:{number}")
            if not keys:
                raise ValueError(f"apiKeysFile {self.path!r} holds no keys")
            self._keys = keys
            self._mtime = mtime

    def tenant(self, key: str) -> Tenant | None:
        """The key's tenant, or None when the key is not in the file."""
        try:
            self._load()
        except (OSError, ValueError) as exc:
            # A Secret being rotated can vanish for a moment: keep the last good keys.
            log.warning("kept the previous API keys: re-reading %s failed: %s", self.path, exc)
        # Digests, not the keys, are compared: how long a lookup takes says nothing about
        # how much of a guessed key was right.
        return self._keys.get(_digest(key))

    def allows(self, key: str) -> bool:
        return self.tenant(key) is not None


def _tenant(digest: bytes, options: list[str], where: str) -> Tenant:
    weight, max_concurrency = 1.0, None
    for option in options:
        name, eq, value = option.partition("=")
        if not eq or name not in _OPTIONS:
            raise ValueError(f"{where}: option {option!r} is not name=value with a name "
                             f"among {', '.join(_OPTIONS)}")
        if name == "weight":
            try:
                weight = float(value)
            except ValueError:
                weight = 0.0
            if not 0 < weight < float("inf"):
                raise ValueError(f"{where}: weight={value!r} must be a number > 0")
        else:
            if not (value.isascii() and value.isdigit()) or int(value) < 1:
                raise ValueError(f"{where}: maxConcurrency={value!r} must be an integer >= 1")
            max_concurrency = int(value)
    return Tenant(name=digest.hex()[:16], weight=weight, max_concurrency=max_concurrency)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()
