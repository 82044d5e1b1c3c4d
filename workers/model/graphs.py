"""Decode and MTP-verify steps from preallocated buffers, captured as CUDA graphs per
batch-size bucket.

Shapes: B real sequences of a step, N its bucket (the smallest of 1, 2, 4, ..., max_num_seqs
that holds B), Q tokens per sequence (1 for decode, 1 + K for verification), T = N * Q token
rows, P = pages per sequence at max_model_len, H hidden.

A graphed step, the life of one decode batch:
1. host: the ForwardBatch is checked (batch.check_batch, the same check every step gets) and
   written into a pinned host mirror of the step's inputs, one int32 buffer in sections
   (input ids, KV rows, slot ids, initial-state flags, context lengths, cu_seqlens, page
   tables, each sized for the largest bucket). Rows B..N-1 are inert: slot -1, context 0,
   no token (cu_seqlens stops at the real tokens), KV row -1, token id 0.
2. one non-blocking copy moves the mirror to the same buffer on the device;
3. the bucket's graph replays: initial-state flags from their int32 section, then
   embeddings -> every layer through the kernels (a KernelPlan over views of the device
   buffer) -> norm_f, into the graph's own output [T, H];
4. the caller takes rows 0..(real tokens - 1): inert rows are never sampled.
The MTP depth's draft forwards take the same way (kinds DRAFT and DRAFT_ENTRIES), their
input hidden states copied device to device into one more static buffer. Nothing in 2-3
reads the device back. The graph of a bucket is captured when a step first
needs it (after an eager run on inert rows that compiles the kernels), into one memory pool
shared by all buckets: they never run at the same time and each keeps its output tensor.

Without CUDA (the CPU interpreter of the tests) the same buffers and plans run eagerly, so
the bucket and padding logic is the one a GPU replays. Graphs need the kernels' path
(model.kernels == "triton": inert rows mean nothing to the torch reference) and no expert
parallelism (its dispatch sizes its messages on the host).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable

import torch

from .batch import ForwardBatch, KernelPlan, check_batch

log = logging.getLogger(__name__)

SECTIONS = ("input_ids", "kv_slots", "slot_ids", "has_initial_state", "context_lens",
            "cu_seqlens", "block_tables")


class StepKind(str, enum.Enum):
    """The step shapes that have graphs."""

    DECODE = "decode"  # one new token per sequence
    VERIFY = "verify"  # MTP verification: up to 1 + K tokens per sequence, per-token snapshots
    DRAFT = "draft"  # the MTP depth on one entry per sequence (a chained draft)
    DRAFT_ENTRIES = "draft-entries"  # the MTP depth on up to 1 + K entries (a step's first)

    @property
    def is_draft(self) -> bool:
        return self in (StepKind.DRAFT, StepKind.DRAFT_ENTRIES)


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, ... below max_num_seqs, then max_num_seqs itself."""
    if isinstance(max_num_seqs, bool) or not isinstance(max_num_seqs, int) or max_num_seqs < 1:
        raise ValueError(f"max_num_seqs: must be an integer >= 1, got {max_num_seqs!r}")
    buckets, n = [], 1
    while n < max_num_seqs:
        buckets.append(n)
        n *= 2
    return [*buckets, max_num_seqs]


def bucket_for(num_seqs: int, buckets: list[int]) -> int | None:
    """The smallest bucket holding num_seqs sequences (None: more than the largest)."""
    return next((b for b in buckets if b >= num_seqs), None)


class StepBuffers:
    """The graphed steps' inputs: one int32 buffer in sections, mirrored on the host (pinned
    on CUDA) and on the device, sized for `max_seqs` sequences of `tokens_per_seq` tokens."""

    def __init__(self, max_seqs: int, tokens_per_seq: int, pages_per_seq: int,
                 device: torch.device):
        rows = max_seqs * tokens_per_seq
        sizes = dict(input_ids=rows, kv_slots=rows, slot_ids=max_seqs,
                     has_initial_state=max_seqs, context_lens=max_seqs,
                     cu_seqlens=max_seqs + 1, block_tables=max_seqs * pages_per_seq)
        self.offsets: dict[str, tuple[int, int]] = {}
        total = 0
        for name in SECTIONS:
            self.offsets[name] = (total, sizes[name])
            total += sizes[name]
        self.pages_per_seq = pages_per_seq
        self.device = device
        self.host = torch.zeros(total, dtype=torch.int32, pin_memory=device.type == "cuda")
        self.on_device = torch.zeros(total, dtype=torch.int32, device=device)
        # The kernels take the flags as bool; the graph derives them from their section.
        self.flags = torch.zeros(max_seqs, dtype=torch.bool, device=device)
        self._copied: torch.cuda.Event | None = None

    def section(self, name: str, on_device: bool = True) -> torch.Tensor:
        start, size = self.offsets[name]
        return (self.on_device if on_device else self.host)[start:start + size]

    def tables(self, num_seqs: int, on_device: bool = True) -> torch.Tensor:
        """[num_seqs, P] page tables (the first rows of their section)."""
        return self.section("block_tables", on_device)[:num_seqs * self.pages_per_seq].view(
            num_seqs, self.pages_per_seq)

    def wait_for_copy(self) -> None:
        """The host mirror may be written again once the last copy from it has left (a wait
        on the copy, not on the step's results)."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None

    def upload(self, num_seqs: int) -> None:
        """Copies the mirror over, up to the page tables of `num_seqs` sequences."""
        end = self.offsets["block_tables"][0] + num_seqs * self.pages_per_seq
        self.on_device[:end].copy_(self.host[:end], non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()


class StepGraphs:
    """model.forward_batch for decode and verify batches, replayed from buckets."""

    def __init__(self, model, cache, max_num_seqs: int, capture: bool | None = None,
                 max_model_len: int | None = None):
        if getattr(model, "kernels", "torch") != "triton":
            raise ValueError("kernels: graphed steps need the kernels' path (load_model "
                             f"kernels='triton' or 'auto' on CUDA), the model has "
                             f"{getattr(model, 'kernels', 'torch')!r}")
        self.model, self.cache = model, cache
        self.device = model.device
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.spec_tokens = cache.spec_tokens
        self.buckets = batch_buckets(max_num_seqs)
        # Page tables as wide as the engine's longest sequence (and its drafts) can use.
        longest = max_model_len or model.max_model_len
        self.pages_per_seq = -(-(longest + self.spec_tokens + 1) // cache.page_size)
        if cache.num_pages * cache.page_size >= 2 ** 31:
            raise ValueError(f"num_pages: {cache.num_pages} pages of {cache.page_size} tokens "
                             "exceed the int32 KV rows of the graphed steps")
        self.buffers = StepBuffers(self.buckets[-1], 1 + self.spec_tokens, self.pages_per_seq,
                                   self.device)
        # The MTP depth's input hidden states (drafts only: MTP layers of attention and MoE,
        # whose multi-entry steps are decode-shaped; a Mamba sublayer would need the scan).
        self.drafts = bool(self.spec_tokens) and model.mtp is not None and \
            "mamba" not in model.config.mtp_layer_kinds
        self.mtp_hidden = torch.zeros(
            self.buckets[-1] * (1 + self.spec_tokens) if self.drafts else 0,
            model.config.hidden_size, dtype=model.dtype, device=self.device)
        self._steps: dict[tuple[StepKind, int], Callable[[], torch.Tensor]] = {}
        self._graphs: dict[tuple[StepKind, int], torch.cuda.CUDAGraph] = {}
        self._outputs: dict[tuple[StepKind, int], torch.Tensor] = {}
        self._pool = None
        self.replays = 0
        """Steps served from a bucket (graph replays on CUDA, eager bucket runs elsewhere)."""

    @staticmethod
    def supports(model) -> bool:
        """The kernels' path and no expert-parallel stacks (their dispatch syncs)."""
        from baton.kernels.ep import EPQuantExperts

        return getattr(model, "kernels", "torch") == "triton" and not any(
            isinstance(m, EPQuantExperts) for m in model.modules())

    @property
    def captured(self) -> list[tuple[StepKind, int]]:
        """(kind, bucket) of every graph captured so far."""
        return sorted(self._graphs)

    # ------------------------------------------------------------------ the step
    def kind_of(self, batch: ForwardBatch) -> StepKind | None:
        """The graphed kind of this batch, None when it runs eagerly (prefill chunks, too many
        sequences)."""
        if bucket_for(len(batch.seq_lens), self.buckets) is None:
            return None
        if batch.spec_verify:
            return StepKind.VERIFY if self.spec_tokens else None
        return StepKind.DECODE if all(int(n) == 1 for n in batch.seq_lens) else None

    def draft_kind_of(self, batch: ForwardBatch) -> StepKind | None:
        """The graphed kind of an MTP depth over `batch`, None when it runs eagerly."""
        if not self.drafts or batch.spec_verify or \
                bucket_for(len(batch.seq_lens), self.buckets) is None:
            return None
        longest = max(int(n) for n in batch.seq_lens)
        if longest == 1:
            return StepKind.DRAFT
        return StepKind.DRAFT_ENTRIES if longest <= 1 + self.spec_tokens else None

    @torch.inference_mode()
    def mtp_forward(self, prev_hidden: torch.Tensor, next_ids: torch.Tensor,
                    batch: ForwardBatch, cache=None) -> torch.Tensor:
        """model.mtp_forward's result, from its bucket when the batch is draft-shaped and
        next_ids are the batch's input ids (as the runner passes them), else eagerly."""
        if cache is not None and cache is not self.cache:
            raise ValueError("cache: the graphed steps are bound to the engine's cache")
        kind = self.draft_kind_of(batch) if next_ids is batch.input_ids else None
        if kind is None:
            return self.model.mtp_forward(prev_hidden, next_ids, batch, self.cache)
        n = sum(int(x) for x in batch.seq_lens)
        if tuple(prev_hidden.shape) != (n, self.model.config.hidden_size):
            raise ValueError(f"prev_hidden: expected [{n}, {self.model.config.hidden_size}] "
                             f"for a batch of {n} tokens, got {tuple(prev_hidden.shape)}")
        bucket = bucket_for(len(batch.seq_lens), self.buckets)
        if (kind, bucket) not in self._steps:
            self._prepare(kind, bucket)
        tokens = self.stage(batch, kind, bucket)
        self.mtp_hidden[:tokens].copy_(prev_hidden, non_blocking=True)
        return self.launch(kind, bucket)[:tokens]

    @torch.inference_mode()
    def forward_batch(self, batch: ForwardBatch, cache=None,
                      on_layer_done: Callable[[int], None] | None = None) -> torch.Tensor:
        """model.forward_batch's result for `batch`: from its bucket when it is a decode or
        verify batch (and nobody waits on single layers), else the eager forward. The rows
        returned from a bucket are a view of its output: valid until its next replay."""
        if cache is not None and cache is not self.cache:
            raise ValueError("cache: the graphed steps are bound to the engine's cache")
        kind = None if on_layer_done is not None else self.kind_of(batch)
        if kind is None:
            return self.model.forward_batch(batch, self.cache, on_layer_done=on_layer_done)
        bucket = bucket_for(len(batch.seq_lens), self.buckets)
        key = (kind, bucket)
        if key not in self._steps:
            self._prepare(kind, bucket)
        tokens = self.stage(batch, kind, bucket)
        out = self.launch(kind, bucket)
        return out[:tokens]

    def stage(self, batch: ForwardBatch, kind: StepKind, bucket: int) -> int:
        """Host part: checks the batch, writes it and the inert rows up to `bucket` into the
        host mirror, does the cache's bookkeeping of a main-model step and starts the copy.
        Returns the real tokens."""
        m = self.model
        checked = check_batch(batch, page_size=self.cache.page_size,
                              num_pages=self.cache.num_pages, num_slots=self.cache.num_slots,
                              max_len=m.max_model_len, spec_tokens=self.spec_tokens,
                              vocab_size=m.config.vocab_size)
        seqs, tokens = len(checked.seq_lens), len(checked.positions)
        if max(checked.pages_needed) > self.pages_per_seq:
            raise ValueError(
                f"block_tables: a sequence spans {max(checked.pages_needed)} pages, the graphed "
                f"steps hold {self.pages_per_seq} per sequence (max_model_len)")
        rows = bucket * self._tokens_per_seq(kind)
        buf = self.buffers
        buf.wait_for_copy()

        def fill(name: str, real: torch.Tensor, count: int, inert: int) -> None:
            section = buf.section(name, on_device=False)
            section[:real.shape[0]] = real
            section[real.shape[0]:count] = inert

        pages, offsets = checked.kv_rows(self.cache.page_size)
        fill("input_ids", checked.input_ids, rows, 0)
        fill("kv_slots", pages * self.cache.page_size + offsets, rows, -1)
        fill("slot_ids", torch.tensor(checked.slots), bucket, -1)
        fill("has_initial_state", torch.tensor([c > 0 for c in checked.cached_lens]), bucket,
             0)
        fill("context_lens", torch.tensor(checked.context_lens), bucket, 0)
        lens = torch.tensor([0, *checked.seq_lens]).cumsum(0)
        fill("cu_seqlens", lens, bucket + 1, tokens)  # inert sequences own no token
        tables = buf.tables(bucket, on_device=False)
        tables.fill_(-1)
        width = min(checked.tables.shape[1], self.pages_per_seq)
        tables[:seqs, :width] = checked.tables[:, :width]
        if not kind.is_draft:
            m.mark_pending(checked, self.cache)
        buf.upload(bucket)
        return tokens

    def launch(self, kind: StepKind, bucket: int) -> torch.Tensor:
        """Device part: replays the bucket's graph (or runs its step eagerly without CUDA) on
        what stage() copied; nothing here reads back to the host. Returns its [T, H]."""
        key = (kind, bucket)
        self.replays += 1
        if key in self._graphs:
            self._graphs[key].replay()
            return self._outputs[key]
        return self._steps[key]()

    # ------------------------------------------------------------------ buckets
    def _tokens_per_seq(self, kind: StepKind) -> int:
        return 1 if kind in (StepKind.DECODE, StepKind.DRAFT) else 1 + self.spec_tokens

    def plan_for(self, kind: StepKind, bucket: int) -> KernelPlan:
        """The KernelPlan of a bucket: views of the device buffer, host ints of its shape."""
        buf, rows = self.buffers, bucket * self._tokens_per_seq(kind)
        return KernelPlan(
            cu_seqlens=buf.section("cu_seqlens")[:bucket + 1],
            context_lens=buf.section("context_lens")[:bucket],
            slot_ids=buf.section("slot_ids")[:bucket],
            has_initial_state=buf.flags[:bucket], block_tables=buf.tables(bucket),
            kv_slots=buf.section("kv_slots")[:rows],
            max_tokens=self._tokens_per_seq(kind), spec_tokens=self.spec_tokens,
            spec_verify=kind is StepKind.VERIFY, split_tokens=self.model.split_tokens)

    def _prepare(self, kind: StepKind, bucket: int) -> None:
        """Builds the bucket's step and, on CUDA, captures it: first an eager run on inert
        rows (it compiles the kernels and touches no cache row), then the capture."""
        plan = self.plan_for(kind, bucket)
        rows = bucket * self._tokens_per_seq(kind)
        buf = self.buffers
        ids = buf.section("input_ids")[:rows]
        flags = buf.section("has_initial_state")[:bucket]

        hidden = self.mtp_hidden[:rows]

        def step() -> torch.Tensor:
            torch.ne(flags, 0, out=buf.flags[:bucket])
            if kind.is_draft:
                return self.model.mtp_planned(hidden, ids, plan, self.cache)
            return self.model.forward_planned(ids, plan, self.cache)

        key = (kind, bucket)
        self._steps[key] = step
        if not self.capture:
            return
        self._make_inert(bucket, rows)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                out = step()
        except RuntimeError as err:
            raise RuntimeError(
                f"CUDA graph capture of the {kind.value} step at batch {bucket} failed "
                f"({err}); run with EngineConfig.enforce_eager=True (Model spec "
                "engine.cudaGraphs: false) to serve without graphs") from err
        self._pool = graph.pool()
        self._graphs[key], self._outputs[key] = graph, out
        log.info("captured the %s step for batch %d (%d token rows)", kind.value, bucket, rows)

    def _make_inert(self, bucket: int, rows: int) -> None:
        """Every row of the bucket inert on the device (for the warm-up run)."""
        buf = self.buffers
        buf.wait_for_copy()
        for name, count, value in (("input_ids", rows, 0), ("kv_slots", rows, -1),
                                   ("slot_ids", bucket, -1), ("has_initial_state", bucket, 0),
                                   ("context_lens", bucket, 0), ("cu_seqlens", bucket + 1, 0)):
            buf.section(name, on_device=False)[:count] = value
        buf.tables(bucket, on_device=False).fill_(-1)
        buf.upload(bucket)
