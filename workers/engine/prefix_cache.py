"""The hybrid prefix cache: content-addressed KV pages and Mamba state snapshots.

A hit at position p needs, in this engine, the KV of every attention layer for tokens [0, p)
AND every Mamba layer's conv + SSM state exactly at p, which no page can rebuild (DESIGN.md,
Round 2 seams: Prefix cache). So there are two caches, evicted independently:

- Pages. A full page of committed tokens is published in a trie: node j+1 is the prefix of
  j + 1 full pages, a child of node j under the chain key xxh3_128(key_j, page tokens). A
  lookup walks from the root and accepts a child only if it is a child of the node it came
  from and its stored tokens equal the prompt's: a hash collision costs a miss, never wrong
  KV. Published pages are reference-counted (allocator.py) and, once unheld, wait in an LRU
  until a fresh page is needed; losing a node's last page drops its subtree.
- Snapshots: a row of the snapshot pool (ModelCache.allocate_snapshots) holding the conv + SSM
  state of every Mamba layer and the hidden state of position p - 1, plus a frozen copy of the
  page holding position p - 1 (the "tail", 1..page_size tokens). The tail copy makes every
  snapshot self-contained past the last full page it sits on; a sequence that hits copies it
  into a page of its own before writing after p, so shared pages are never written.
  Snapshots live in their own LRU with a fixed number of rows; a page chain without a snapshot
  at its end is no hit.

MTP. MTP entry i pairs hidden state i with token i + 1, and lives in the page of position i:
the entry in a page's last slot depends on the first token of the next page. So a page is
published with the token its last entry was computed with ("variant"; None when the sequence
kept no MTP state), and a sequence that keeps MTP state passes through a page only along the
variant of its own next token. The hit's own entry p - 1 is recomputed from the snapshot's
hidden state (in the private tail copy), which is also what lets a hit cover a whole prompt:
the first token is sampled from that hidden state with no forward at all.

Isolation (a cache salt: the router's per-API-key salt, or vLLM's `cache_salt`): a salted
sequence's chain starts from its salt's own root (keys[0] = salt_key(salt)), so its pages and
snapshots are on a trie of their own: a prompt cached under one salt is no hit under another
or under none. A salt's root lives while it holds anything.

Snapshots hold committed state only: they are taken after a step's update (chunk ends on
multiples of snapshot_interval, prompt ends, request ends), never from speculation buffers.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch
import xxhash

from baton.workers.engine.allocator import PageAllocator, PoolExhausted

ROOT_KEY = 0


def salt_key(salt: bytes) -> int:
    """The root key of a cache salt's trie (ROOT_KEY: no salt, the shared trie)."""
    if not salt:
        return ROOT_KEY
    return xxhash.xxh3_128_intdigest(b"baton-cache-salt\0" + salt) or 1


def page_key(parent: int, tokens: Seq[int]) -> int:
    """Chain key of a prefix: xxh3_128 over the parent prefix's key and one page's tokens."""
    return xxhash.xxh3_128_intdigest(parent.to_bytes(16, "little")
                                     + array("i", tokens).tobytes())


class _Node:
    """A prefix of `depth` full pages; holds the variants of its last page."""

    __slots__ = ("key", "parent", "tokens", "depth", "pages", "children", "snapshots", "alive")

    def __init__(self, key: int, parent: _Node | None, tokens: tuple[int, ...], depth: int):
        self.key = key
        self.parent = parent
        self.tokens = tokens
        self.depth = depth
        self.pages: dict[int | None, int] = {}  # MTP variant (next token) -> page id
        self.children: dict[int, _Node] = {}
        self.snapshots: dict[tuple[int, ...], Snapshot] = {}  # tail tokens -> snapshot
        self.alive = True


@dataclass(eq=False)
class Snapshot:
    """Mamba state (and hidden state) at `position`, on the page chain of `node`."""

    row: int
    node: _Node
    position: int
    tail: tuple[int, ...]
    """Tokens of the page holding position - 1 (1..page_size of them)."""
    tail_page: int
    """A frozen copy of that page, held by the snapshot."""
    mtp: bool
    """The chain and tail carry MTP entries [0, position - 1)."""
    pins: int = 0


@dataclass
class Hit:
    """The longest usable cached prefix of a sequence."""

    position: int
    """Tokens [0, position) are cached (KV + Mamba state at position)."""
    pages: list[int]
    """Shared pages of the full pages before the tail (held by the sequence once taken)."""
    snapshot: Snapshot


@dataclass
class PrefixStats:
    queried_tokens_total: int = 0
    hit_tokens_total: int = 0
    snapshots_total: int = 0
    snapshot_evictions_total: int = 0
    page_evictions_total: int = 0
    snapshots: int = 0
    snapshot_rows: int = 0
    cached_pages: int = 0
    snapshot_pages: int = 0


@dataclass
class CacheKeys:
    """A sequence's chain keys (keys[j]: prefix of j full pages) and what it published."""

    keys: list[int] = field(default_factory=lambda: [ROOT_KEY])
    node: _Node | None = None
    """The deepest node on this sequence's chain it published or hit (None: the root)."""
    published: int = 0
    """Full pages of the sequence that are on the trie (its own or shared)."""
    broken: bool = False
    """Its chain left the trie (evicted under it, or a key collision): it publishes and
    snapshots nothing more."""


class PrefixCache:
    """The prefix cache of one engine (see the module docstring)."""

    def __init__(self, pages: PageAllocator, cache, num_snapshots: int, hidden_size: int):
        self.pages = pages
        self.cache = cache
        self.page_size = pages.page_size
        self.root = _Node(ROOT_KEY, None, (), 0)
        self.roots: dict[int, _Node] = {ROOT_KEY: self.root}  # by salt_key
        self.num_snapshots = num_snapshots
        self._page_node: dict[int, tuple[_Node, int | None]] = {}
        self._lru: OrderedDict[Snapshot, None] = OrderedDict()  # oldest first
        self._rows = list(range(num_snapshots - 1, -1, -1))
        self._pinned = 0
        self.stats = PrefixStats(snapshot_rows=num_snapshots)
        cache.allocate_snapshots(num_snapshots, hidden_size)
        pages.on_evict = self._evicted
        pages.reclaimer = self

    # ---- keys ----------------------------------------------------------------------------

    def _root(self, keys: CacheKeys) -> _Node:
        """The root of the sequence's salt (made on first use)."""
        key = keys.keys[0]
        root = self.roots.get(key)
        if root is None:
            root = self.roots[key] = _Node(key, None, (), 0)
        return root

    def _prune(self, node: _Node) -> None:
        """A salt's root that holds nothing more goes (the shared root stays)."""
        if node.parent is None and node.key != ROOT_KEY and not node.children \
                and not node.snapshots and self.roots.get(node.key) is node:
            del self.roots[node.key]
            node.alive = False  # a sequence on it publishes no more (keys.broken)

    def keys(self, keys: CacheKeys, tokens: Seq[int], num_pages: int) -> list[int]:
        """keys.keys extended to cover num_pages full pages of tokens."""
        ps = self.page_size
        chain = keys.keys
        while len(chain) <= num_pages:
            j = len(chain) - 1
            chain.append(page_key(chain[j], tokens[j * ps:(j + 1) * ps]))
        return chain

    # ---- lookup --------------------------------------------------------------------------

    def lookup(self, keys: CacheKeys, tokens: Seq[int], mtp: bool,
               limit: int | None = None) -> Hit | None:
        """The deepest snapshot at a position <= limit (default len(tokens)) whose page chain
        matches tokens; mtp: the sequence keeps MTP state (see the module docstring)."""
        limit = len(tokens) if limit is None else min(limit, len(tokens))
        if limit < 1 or not self.num_snapshots:
            return None
        ps = self.page_size
        chain = self.keys(keys, tokens, max(0, (limit - 1) // ps))
        node, shared, best = self.roots.get(keys.keys[0]), [], None
        if node is None:
            return None  # nothing under this salt
        while True:
            snapshot = self._best_at(node, tokens, limit, mtp)
            if snapshot is not None:
                best = Hit(snapshot.position, list(shared), snapshot)
            m = node.depth
            # Going one page deeper needs a snapshot past it to be possible, and (with MTP)
            # the token after it to pick the page's variant.
            if (m + 1) * ps + 1 > limit:
                break
            child = node.children.get(chain[m + 1])
            if child is None or child.tokens != tuple(tokens[m * ps:(m + 1) * ps]):
                break
            page = child.pages.get(tokens[(m + 1) * ps]) if mtp else next(
                iter(child.pages.values()))
            if page is None:
                break
            shared.append(page)
            node = child
        return best

    def _best_at(self, node: _Node, tokens: Seq[int], limit: int, mtp: bool):
        if not node.snapshots:
            return None
        start = node.depth * self.page_size
        best = None
        for tail, snapshot in node.snapshots.items():
            end = start + len(tail)
            if end > limit or (mtp and not snapshot.mtp):
                continue
            if best is not None and len(tail) <= len(best.tail):
                continue
            if tuple(tokens[start:end]) == tail:
                best = snapshot
        return best

    # ---- taking a hit --------------------------------------------------------------------

    def take(self, hit: Hit, num_fresh: int) -> list[int]:
        """Holds the hit's shared pages and num_fresh (>= 1) fresh pages, the first of which
        receives the snapshot's tail; returns the sequence's pages. PoolExhausted leaves
        everything as it was."""
        for page in hit.pages:
            self.pages.share(page)
        self._pin(hit.snapshot, 1)
        try:
            fresh = self.pages.allocate(num_fresh)
        except PoolExhausted:
            self.pages.free(hit.pages)
            raise
        finally:
            self._pin(hit.snapshot, -1)
        self.cache.copy_pages([hit.snapshot.tail_page], [fresh[0]])
        self._lru.move_to_end(hit.snapshot)
        return hit.pages + fresh

    def _pin(self, snapshot: Snapshot, delta: int) -> None:
        snapshot.pins += delta
        self._pinned += delta

    def pages_needed(self, hit: Hit | None, total: int) -> int:
        """Of the pages counted free, how many a sequence needing `total` pages takes with
        this hit: its fresh pages, its shared pages now waiting in the LRU, and the hit's own
        snapshot page (counted reclaimable, but kept while the hit is taken)."""
        if hit is None:
            return total
        waiting = sum(1 for p in hit.pages if self.pages.refs(p) == 0)
        return total - len(hit.pages) + waiting + 1

    def attach(self, keys: CacheKeys, hit: Hit) -> None:
        """The sequence that took `hit` continues the chain from the hit's node."""
        keys.node = hit.snapshot.node
        keys.published = hit.snapshot.node.depth

    def restore(self, hit: Hit, slot: int) -> torch.Tensor:
        """Slot := the snapshot's Mamba state; returns its hidden state of position - 1."""
        return self.cache.restore_snapshot(hit.snapshot.row, slot)

    # ---- publishing ----------------------------------------------------------------------

    def publish(self, keys: CacheKeys, tokens: Seq[int], pages: list[int], committed: int,
                mtp: bool) -> None:
        """Publishes the sequence's full pages of its first `committed` tokens (whose KV, and
        with mtp its MTP entries, are final)."""
        self._publish(keys, tokens, pages, committed, mtp)
        root = self.roots.get(keys.keys[0])
        if root is not None:
            self._prune(root)  # a salt's root made for nothing

    def _publish(self, keys: CacheKeys, tokens: Seq[int], pages: list[int], committed: int,
                 mtp: bool) -> None:
        ps = self.page_size
        full = committed // ps
        if keys.broken or keys.published >= full:
            return
        chain = self.keys(keys, tokens, full)
        while keys.published < full:
            node, j = keys.node or self._root(keys), keys.published
            if not node.alive:
                keys.broken = True  # its chain was evicted under it
                return
            if mtp and len(tokens) <= (j + 1) * ps:
                return
            page_tokens = tuple(tokens[j * ps:(j + 1) * ps])
            child = node.children.get(chain[j + 1])
            if child is None:
                child = node.children[chain[j + 1]] = _Node(chain[j + 1], node, page_tokens,
                                                            j + 1)
            elif child.tokens != page_tokens:
                keys.broken = True  # a key collision: this chain stays private from here
                return
            self._add_variant(child, tokens[(j + 1) * ps] if mtp else None, pages[j])
            keys.node, keys.published = child, j + 1

    def _add_variant(self, node: _Node, variant: int | None, page: int) -> None:
        existing = node.pages.get(variant)
        if existing == page:
            return
        if existing is not None:
            if self.pages.refs(existing) > 0:
                return  # both copies are in use; the published one stays
            # An identical copy nobody holds: publish the held one instead (it is live).
            del self._page_node[existing]
            self.pages.uncache(existing)
        if page in self._page_node:
            return  # already published elsewhere (a page is on one node under one variant)
        node.pages[variant] = page
        self._page_node[page] = (node, variant)
        self.pages.mark_cached(page)

    # ---- snapshots -----------------------------------------------------------------------

    def snapshot(self, keys: CacheKeys, tokens: Seq[int], pages: list[int], slot: int,
                 position: int, hidden: torch.Tensor, mtp: bool) -> bool:
        """Snapshots the slot's state at `position` (the sequence's committed length) with
        its hidden state of position - 1; False when it cannot (no row, no page, or its
        pages are not on the trie). An existing snapshot of the same prefix is refreshed."""
        done = self._snapshot(keys, tokens, pages, slot, position, hidden, mtp)
        root = self.roots.get(keys.keys[0])
        if not done and root is not None:
            self._prune(root)  # a salt's root made for nothing
        return done

    def _snapshot(self, keys: CacheKeys, tokens: Seq[int], pages: list[int], slot: int,
                  position: int, hidden: torch.Tensor, mtp: bool) -> bool:
        if not self.num_snapshots or position < 1:
            return False
        ps = self.page_size
        q = (position - 1) // ps
        node = keys.node or self._root(keys)
        if keys.published < q or not node.alive:
            return False
        while node.depth > q:
            node = node.parent
        tail = tuple(tokens[q * ps:position])
        existing = node.snapshots.get(tail)
        if existing is not None:
            if existing.mtp or not mtp:
                self._lru.move_to_end(existing)
                return True
            self._drop(existing)  # replaced by one that also serves MTP
        row = self._take_row()
        if row is None:
            return False
        try:
            (tail_page,) = self.pages.allocate(1)
        except PoolExhausted:
            self._rows.append(row)
            return False
        if not node.alive:  # the allocation evicted this very chain
            self.pages.free([tail_page])
            self._rows.append(row)
            return False
        self.cache.copy_pages([pages[q]], [tail_page])
        self.cache.save_snapshot(slot, row, hidden)
        snapshot = Snapshot(row, node, position, tail, tail_page, mtp)
        node.snapshots[tail] = snapshot
        self._lru[snapshot] = None
        self.stats.snapshots_total += 1
        return True

    def _take_row(self) -> int | None:
        if self._rows:
            return self._rows.pop()
        victim = next((s for s in self._lru if not s.pins), None)
        if victim is None:
            return None
        self._drop(victim)
        self.stats.snapshot_evictions_total += 1
        return self._rows.pop()

    def _drop(self, snapshot: Snapshot) -> None:
        del snapshot.node.snapshots[snapshot.tail]
        del self._lru[snapshot]
        self._rows.append(snapshot.row)
        self.pages.free([snapshot.tail_page])
        self._prune(snapshot.node)

    # ---- PageReclaimer (the allocator asks when fresh pages run short) --------------------

    def reclaimable(self) -> int:
        return len(self._lru) - self._pinned

    def reclaim(self, n: int) -> None:
        for snapshot in [s for s in self._lru if not s.pins][:n]:
            self._drop(snapshot)
            self.stats.snapshot_evictions_total += 1

    # ---- eviction ------------------------------------------------------------------------

    def _evicted(self, page: int) -> None:
        """The allocator reused a cached page: its node loses that variant."""
        node, variant = self._page_node.pop(page)
        del node.pages[variant]
        self.stats.page_evictions_total += 1
        if not node.pages:
            self._remove(node)

    def _remove(self, node: _Node) -> None:
        """A node without pages: it and everything below it can no longer hit."""
        parent = node.parent
        del parent.children[node.key]
        self._prune(parent)
        stack = [node]
        while stack:
            n = stack.pop()
            n.alive = False
            for snapshot in list(n.snapshots.values()):
                self._drop(snapshot)
            for page in n.pages.values():
                del self._page_node[page]
                self.pages.uncache(page)
            n.pages.clear()
            stack.extend(n.children.values())
            n.children.clear()

    # ---- consistency ---------------------------------------------------------------------

    def audit(self) -> dict[str, int]:
        """Checks the trie, the snapshot pool and the pages against each other; returns the
        allocator's counts plus snapshots. RuntimeError names what is inconsistent."""
        counts = self.pages.audit()
        seen: dict[int, _Node] = {}
        snapshots = 0
        stack = list(self.roots.values())
        while stack:
            node = stack.pop()
            if not node.alive:
                raise RuntimeError(f"a removed node (depth {node.depth}) is still on the trie")
            if node.parent is not None and not node.pages:
                raise RuntimeError(f"a node (depth {node.depth}) has no page")
            if node.parent is None and node is not self.root and not (
                    node.children or node.snapshots):
                raise RuntimeError("a cache salt's root holds nothing and was kept")
            for variant, page in node.pages.items():
                if page in seen or self._page_node.get(page) != (node, variant):
                    raise RuntimeError(f"page {page} is published twice or not recorded")
                if not self.pages.is_cached(page):
                    raise RuntimeError(f"published page {page} is not marked cached")
                seen[page] = node
            for tail, snapshot in node.snapshots.items():
                snapshots += 1
                if snapshot.node is not node or snapshot.tail != tail:
                    raise RuntimeError("a snapshot hangs on the wrong node")
                if snapshot not in self._lru or self.pages.refs(snapshot.tail_page) < 1:
                    raise RuntimeError(f"snapshot at {snapshot.position} lost its row or page")
            for key, child in node.children.items():
                if child.parent is not node or child.key != key or child.depth != node.depth + 1:
                    raise RuntimeError("a child is linked to the wrong parent")
                stack.append(child)
        if len(seen) != len(self._page_node):
            raise RuntimeError("a recorded page is not on the trie")
        if snapshots != len(self._lru) or snapshots + len(self._rows) != self.num_snapshots:
            raise RuntimeError(f"{snapshots} snapshots on the trie, {len(self._lru)} in the "
                               f"LRU, {len(self._rows)} free rows of {self.num_snapshots}")
        if len({s.row for s in self._lru} | set(self._rows)) != self.num_snapshots:
            raise RuntimeError("a snapshot row is used twice")
        return {**counts, "snapshots": snapshots}

    # ---- stats ---------------------------------------------------------------------------

    def count_lookup(self, queried: int, hit: int) -> None:
        self.stats.queried_tokens_total += queried
        self.stats.hit_tokens_total += hit

    def snapshot_usage(self) -> float:
        return len(self._lru) / self.num_snapshots if self.num_snapshots else 0.0

    def report(self) -> PrefixStats:
        st = self.stats
        st.snapshots = len(self._lru)
        st.snapshot_pages = len(self._lru)
        st.cached_pages = self.pages.num_cached
        return st
