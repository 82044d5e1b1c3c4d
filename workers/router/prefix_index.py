"""Which worker holds which prompt prefix, as this router learned it (prefix-aware routing).

A worker can serve a prefix from its cache only up to a point where it holds the KV of every
attention layer AND a Mamba snapshot (DESIGN.md, Round 2 seams: Prefix cache), so the index
records *snapshot points*: "worker W holds tokens[:p] with a snapshot at p". They come from what
this router itself routed and what the workers answered:
- D's Reserve answer and P's Prefill answer say exactly how much of a prompt each held (a
  correction: deeper points this index believed for that prompt are dropped);
- after D's first token, D holds the whole prompt (a snapshot at its end, and with a local
  prefill one every snapshot interval); after P's answer, P holds the same;
- after a request ended (stop or length), D holds prompt + output but its last token.
Points expire after a TTL and the index is bounded (least recently confirmed points go first).

Why learned, not reported by the workers (cache events over gRPC): the Reserve answer already
gives the ground truth for every routed request at no extra cost, so a wrong guess costs one
less-than-ideal choice and is corrected at once; events would need a stream per router and
worker, resynchronisation after every reconnect, and a volume proportional to page churn for
what is only a routing hint. What events would add is visibility of other routers' traffic:
session affinity covers the case that matters, because a session's cache key (OpenAI's
prompt_cache_key) maps to a worker by rendezvous hashing whenever this router has not seen the
session, so every router sends a new session to the same decode worker (load permitting).

Keys are chain hashes over blocks of block_size tokens (xxh3_64 with the parent chain) plus a
hash of the tokens after the last full block: a collision only misleads one routing choice.
"""

from __future__ import annotations

import time
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import xxhash

_ROOT = 0


def _chain(tokens: Sequence[int], block: int, blocks: int) -> list[int]:
    keys = [_ROOT]
    for b in range(blocks):
        data = keys[-1].to_bytes(8, "little") + array("i", tokens[b * block:(b + 1) * block]
                                                      ).tobytes()
        keys.append(xxhash.xxh3_64_intdigest(data))
    return keys


def _tail(tokens: Sequence[int]) -> int:
    return xxhash.xxh3_64_intdigest(array("i", tokens).tobytes())


class PrefixIndex:
    """Snapshot points per worker address (see the module docstring)."""

    def __init__(self, block_size: int, ttl_s: float = 600.0, max_points: int = 200_000):
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1")
        self.block_size = block_size
        self.ttl_s = ttl_s
        self.max_points = max_points
        # (chain key of the full blocks, tokens after them, tail hash) -> {worker: expiry}
        self._points: OrderedDict[tuple[int, int, int], dict[str, float]] = OrderedDict()
        # chain key -> {tail length: points with it} (to probe only the lengths that exist)
        self._tails: dict[int, dict[int, int]] = {}
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._points)

    # ---- keys ----------------------------------------------------------------------------

    def _key(self, tokens: Sequence[int], position: int, chain: list[int]) -> tuple[int, int, int]:
        b, r = divmod(position, self.block_size)
        start = b * self.block_size
        return chain[b], r, _tail(tokens[start:position])

    def _chain(self, tokens: Sequence[int], upto: int) -> list[int]:
        return _chain(tokens, self.block_size, upto // self.block_size)

    # ---- learning ------------------------------------------------------------------------

    def record(self, worker: str, tokens: Sequence[int], positions: Iterable[int],
               now: float | None = None) -> None:
        """worker holds tokens[:p] with a snapshot at each p of positions."""
        positions = sorted({p for p in positions if 0 < p <= len(tokens)})
        if not positions:
            return
        now = time.monotonic() if now is None else now
        chain = self._chain(tokens, positions[-1])
        for p in positions:
            key = self._key(tokens, p, chain)
            holders = self._points.get(key)
            if holders is None:
                holders = self._points[key] = {}
                tails = self._tails.setdefault(key[0], {})
                tails[key[1]] = tails.get(key[1], 0) + 1
            else:
                self._points.move_to_end(key)
            holders[worker] = now + self.ttl_s
        while len(self._points) > self.max_points:
            self._drop(next(iter(self._points)))

    def correct(self, worker: str, tokens: Sequence[int], held: int,
                now: float | None = None) -> None:
        """worker answered that it holds exactly tokens[:held] of this prompt: what the index
        believed beyond that is gone (evicted there), and held itself is confirmed."""
        now = time.monotonic() if now is None else now
        while True:
            believed = self.lookup(tokens, now).get(worker, 0)
            if believed <= held:
                break
            chain = self._chain(tokens, believed)
            key = self._key(tokens, believed, chain)
            holders = self._points.get(key, {})
            holders.pop(worker, None)
            if not holders:
                self._drop(key)
        self.record(worker, tokens, [held], now)

    def forget(self, worker: str) -> None:
        """A worker that went away (or restarted with an empty cache)."""
        for key in list(self._points):
            holders = self._points[key]
            holders.pop(worker, None)
            if not holders:
                self._drop(key)
        for session in [s for s, (w, _) in self._sessions.items() if w == worker]:
            del self._sessions[session]

    def _drop(self, key: tuple[int, int, int]) -> None:
        if self._points.pop(key, None) is None:
            return
        tails = self._tails[key[0]]
        tails[key[1]] -= 1
        if not tails[key[1]]:
            del tails[key[1]]
            if not tails:
                del self._tails[key[0]]

    # ---- lookup --------------------------------------------------------------------------

    def lookup(self, tokens: Sequence[int], now: float | None = None) -> dict[str, int]:
        """The deepest snapshot point each worker is believed to hold of tokens."""
        now = time.monotonic() if now is None else now
        n = len(tokens)
        if not n or not self._points:
            return {}
        chain = self._chain(tokens, n)
        best: dict[str, int] = {}
        for b in range(len(chain) - 1, -1, -1):
            tails = self._tails.get(chain[b])
            if not tails:
                continue
            start = b * self.block_size
            for r in sorted(tails, reverse=True):  # deepest first
                if start + r > n or (r == 0 and b == 0):
                    continue
                holders = self._points.get((chain[b], r, _tail(tokens[start:start + r])))
                if not holders:
                    continue
                for worker, expires in holders.items():
                    if expires > now and worker not in best:
                        best[worker] = start + r
        return best

    # ---- sessions ------------------------------------------------------------------------

    def bind(self, session: str, worker: str, now: float | None = None) -> None:
        """A session (cache key) was last served by worker."""
        now = time.monotonic() if now is None else now
        self._sessions[session] = (worker, now + self.ttl_s)
        self._sessions.move_to_end(session)
        while len(self._sessions) > self.max_points:
            self._sessions.popitem(last=False)

    def session(self, session: str, now: float | None = None) -> str | None:
        """The worker that last served this session, if that is recent enough."""
        now = time.monotonic() if now is None else now
        bound = self._sessions.get(session)
        if bound is None or bound[1] <= now:
            return None
        return bound[0]


def rendezvous(session: str, workers: Sequence[str]) -> str | None:
    """The worker a session hashes to (highest random weight): every router picks the same
    one, and only the sessions of a worker that goes away move."""
    if not workers:
        return None
    return max(workers, key=lambda w: xxhash.xxh3_64_intdigest(f"{session}\0{w}".encode()))
