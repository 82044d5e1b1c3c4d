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
the bucket and padding logic is the one a GPU replays.

The step of a bucket is one function of these buffers (and of the width of the page tables
it reads). With the kernels' path (model.kernels == "triton") its layers launch the Triton
kernels; with the torch path they run static_step.py's fixed-shape torch ops, which read the
page tables only as wide as the batch's longest sequence needs (a dynamic dimension of the
step, at least 2 pages). With compile=True each bucket's function goes through
torch.compile (inductor: C++/OpenMP on the CPU, Triton on a GPU) when first prepared;
warm_up() prepares every bucket up front, so that the compile time is paid at start. Every
graph inductor builds is counted (`compiles`); after warm-up a step that needs a new one is a
recompile (`recompiles`), which the tests forbid. Inductor keeps what it generated on disk
(compile_cache_dir()): a later start with the same model shapes, bucket sizes, torch version
and CPU finds it there. No expert parallelism (its dispatch sizes its messages on the host).
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from .batch import ForwardBatch, KernelPlan, check_batch
from .static_step import StepRows

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


def check_buckets(buckets: list[int], max_num_seqs: int) -> list[int]:
    """Batch sizes given explicitly: ascending integers in [1, max_num_seqs] (a batch above
    the largest runs eagerly)."""
    ok = isinstance(buckets, (list, tuple)) and len(buckets) > 0 and all(
        isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= max_num_seqs
        for b in buckets) and list(buckets) == sorted(set(buckets))
    if not ok:
        raise ValueError(f"buckets: must be ascending distinct integers in [1, max_num_seqs="
                         f"{max_num_seqs}], got {buckets!r}")
    return list(buckets)


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


def compile_cache_dir() -> Path:
    """Where inductor keeps the compiled steps between starts: TORCHINDUCTOR_CACHE_DIR when
    set, else ~/.cache/baton/inductor (XDG_CACHE_HOME respected). An entry is keyed on the
    traced graph (model shapes, bucket, step kind), the torch version, inductor's settings
    and the machine's compiler and CPU; anything else is a new entry, never a wrong one."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # Inductor writes its own default (under the temporary directory) into the variable
    # the first time it looks: that one is replaced, a value set by the user is kept.
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    path = Path(base) / "baton" / "inductor"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


class StepGraphs:
    """model.forward_batch for decode and verify batches (and the MTP depth of drafts), run
    from buckets: replayed as CUDA graphs on a GPU, compiled with torch.compile on request."""

    def __init__(self, model, cache, max_num_seqs: int, capture: bool | None = None,
                 max_model_len: int | None = None, compile: bool = False,
                 buckets: list[int] | None = None):
        kernels = getattr(model, "kernels", "torch")
        if kernels not in ("triton", "torch"):
            raise ValueError(f"kernels: {kernels!r} is not 'triton' or 'torch'")
        self.model, self.cache = model, cache
        self.device = model.device
        # The torch path runs static_step.py's fixed-shape ops (graphs need the kernels').
        self.static = kernels == "torch"
        self.capture = (self.device.type == "cuda" and not self.static) if capture is None \
            else capture
        if self.capture and self.static:
            raise ValueError("capture: CUDA graphs replay the kernels' path (kernels='triton')")
        self.compile = compile
        if compile:
            compile_cache_dir()
        if self.static:
            from .layers import Attention

            for module in model.modules():
                if isinstance(module, Attention):
                    module.fuse_qkv()
        self.compiles = 0
        """Graphs inductor built (each bucket's step once; more is a recompile)."""
        self.warm = False
        """Set by warm_up(): from then on every compile is a recompile."""
        self.recompiles = 0
        self.spec_tokens = cache.spec_tokens
        self.buckets = batch_buckets(max_num_seqs) if buckets is None else \
            check_buckets(buckets, max_num_seqs)
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
        self._width = self.pages_per_seq  # page-table columns the next launch reads
        self.replays = 0
        """Steps served from a bucket (graph replays on CUDA, eager bucket runs elsewhere)."""

    @staticmethod
    def supports(model, static: bool = False) -> bool:
        """No expert-parallel stacks (their dispatch syncs), and the kernels' path unless
        `static` (the torch path's fixed-shape step)."""
        from baton.kernels.ep import EPQuantExperts

        kernels = getattr(model, "kernels", "torch")
        return (kernels == "triton" or static and kernels == "torch") and not any(
            isinstance(m, EPQuantExperts) for m in model.modules())

    def warm_up(self, kinds: list[StepKind] | None = None) -> None:
        """Prepares (compiles, captures) every bucket of `kinds` (default: every kind this
        engine runs) on inert rows, so that no step waits for it later."""
        if kinds is None:
            kinds = [StepKind.DECODE]
            if self.spec_tokens:
                kinds.append(StepKind.VERIFY)
                if self.drafts:
                    kinds += [StepKind.DRAFT, StepKind.DRAFT_ENTRIES]
        for kind in kinds:
            for bucket in self.buckets:
                if (kind, bucket) not in self._steps:
                    self._prepare(kind, bucket)
                    if not self.capture:  # a capture ran it already
                        self._make_inert(bucket, bucket * self._tokens_per_seq(kind))
                        self.launch(kind, bucket, count=False)
        self.warm = True

    def _inductor(self, graph, example_inputs):
        """torch.compile's backend: inductor, counting the graphs it builds."""
        from torch._inductor.compile_fx import compile_fx

        self.compiles += 1
        if self.warm:
            self.recompiles += 1
            log.warning("recompiled a step after warm-up (%d so far)", self.recompiles)
        # Without the generated code's shape and alignment asserts (one call per buffer per
        # step): the shapes are the bucket's, fixed by construction.
        return compile_fx(graph, example_inputs, config_patches={
            "size_asserts": False, "alignment_asserts": False, "scalar_asserts": False})

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
        self._width = self._table_width(max(checked.pages_needed))
        return tokens

    def _table_width(self, pages: int) -> int:
        """Page-table columns a step reads: all of them for the kernels (which stop at each
        context's end themselves); for the torch path the batch's longest sequence, at
        least 2 (a dimension of 1 would be specialized and recompiled)."""
        if not self.static:
            return self.pages_per_seq
        return min(self.pages_per_seq, max(2, pages))

    def launch(self, kind: StepKind, bucket: int, count: bool = True) -> torch.Tensor:
        """Device part: replays the bucket's graph (or runs its step, compiled or eagerly) on
        what stage() copied; nothing here reads back to the host. Returns its [T, H]."""
        key = (kind, bucket)
        if count:
            self.replays += 1
        if key in self._graphs:
            self._graphs[key].replay()
            return self._outputs[key]
        return self._steps[key](self.buffers.tables(bucket)[:, :self._width])

    # ------------------------------------------------------------------ buckets
    def _tokens_per_seq(self, kind: StepKind) -> int:
        return 1 if kind in (StepKind.DECODE, StepKind.DRAFT) else 1 + self.spec_tokens

    def plan_for(self, kind: StepKind, bucket: int,
                 tables: torch.Tensor | None = None) -> KernelPlan:
        """The KernelPlan of a bucket: views of the device buffer, host ints of its shape;
        `tables` [bucket, width]: the page tables the step reads (default: all columns)."""
        buf, rows = self.buffers, bucket * self._tokens_per_seq(kind)
        flags = buf.flags[:bucket]
        if self.static:  # derived here, inside the (compiled) step
            flags = buf.section("has_initial_state")[:bucket] != 0
        plan = KernelPlan(
            cu_seqlens=buf.section("cu_seqlens")[:bucket + 1],
            context_lens=buf.section("context_lens")[:bucket],
            slot_ids=buf.section("slot_ids")[:bucket],
            has_initial_state=flags,
            block_tables=buf.tables(bucket) if tables is None else tables,
            kv_slots=buf.section("kv_slots")[:rows],
            max_tokens=self._tokens_per_seq(kind), spec_tokens=self.spec_tokens,
            spec_verify=kind is StepKind.VERIFY, split_tokens=self.model.split_tokens)
        if self.static:
            cache = self.cache
            plan.static_rows = StepRows(plan, rows, scratch_slot=cache.num_slots,
                                        scratch_kv_row=cache.num_pages * cache.page_size)
        return plan

    def _prepare(self, kind: StepKind, bucket: int) -> None:
        """Builds the bucket's step and, on CUDA, captures it: first an eager run on inert
        rows (it compiles the kernels and touches no cache row), then the capture."""
        rows = bucket * self._tokens_per_seq(kind)
        buf = self.buffers
        ids = buf.section("input_ids")[:rows]
        flags = buf.section("has_initial_state")[:bucket]
        hidden = self.mtp_hidden[:rows]
        model, cache, static = self.model, self.cache, self.static

        def step(tables: torch.Tensor) -> torch.Tensor:
            if not static:
                torch.ne(flags, 0, out=buf.flags[:bucket])
            plan = self.plan_for(kind, bucket, tables)
            if kind.is_draft:
                return model.mtp_planned(hidden, ids, plan, cache)
            return model.forward_planned(ids, plan, cache)

        key = (kind, bucket)
        if self.compile:
            # dynamic=False: each bucket its own graph, specialized on its shapes (the width
            # of the page tables is the one dimension marked dynamic, _with_dynamic_width).
            # Its own code object per bucket: dynamo keeps its graphs per code object, so
            # each bucket holds one graph and checks only its own guards at each call. Only
            # the tensor guards (shapes, dtypes, strides) stay: the rest (the module tree,
            # grad mode, the closure's ints) cannot change for a bucket's step, always called
            # under inference_mode, and checking them cost more than a small step's kernels.
            step.__code__ = step.__code__.replace(co_name=f"step_{kind.value}_{bucket}")
            options = {"guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe}
            compiled = torch.compile(step, backend=self._inductor, fullgraph=True,
                                     dynamic=False, options=options)
            self._steps[key] = self._with_dynamic_width(compiled)
        else:
            self._steps[key] = step
        if not self.capture:
            return
        self._width = self.pages_per_seq
        self._make_inert(bucket, rows)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        step = self._steps[key]
        tables = buf.tables(bucket)
        with torch.cuda.stream(side):
            step(tables)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                out = step(tables)
        except RuntimeError as err:
            raise RuntimeError(
                f"CUDA graph capture of the {kind.value} step at batch {bucket} failed "
                f"({err}); run with EngineConfig.enforce_eager=True (Model spec "
                "engine.cudaGraphs: false) to serve without graphs") from err
        self._pool = graph.pool()
        self._graphs[key], self._outputs[key] = graph, out
        log.info("captured the %s step for batch %d (%d token rows)", kind.value, bucket, rows)

    def _with_dynamic_width(self, compiled: Callable) -> Callable:
        """The compiled step, its page-table width marked dynamic on the first call (one
        graph for every width >= 2; the kernels' path always reads every column). Not a
        strict range: a graph inductor finds in its on-disk cache brings the bound it was
        compiled with, which would contradict a strict one; a width beyond such a bound is
        a counted recompile."""
        first = [True]

        def run(tables: torch.Tensor) -> torch.Tensor:
            if first[0] and self.static and self.pages_per_seq > 2:
                torch._dynamo.maybe_mark_dynamic(tables, 1)
            first[0] = False
            # Grad and inference mode are part of a graph's guards: one mode for all calls.
            with torch.inference_mode():
                return compiled(tables)

        return run

    def _make_inert(self, bucket: int, rows: int) -> None:
        """Every row of the bucket inert on the device (for the warm-up run)."""
        buf = self.buffers
        buf.wait_for_copy()
        self._width = self._table_width(0)
        for name, count, value in (("input_ids", rows, 0), ("kv_slots", rows, -1),
                                   ("slot_ids", bucket, -1), ("has_initial_state", bucket, 0),
                                   ("context_lens", bucket, 0), ("cu_seqlens", bucket + 1, 0)):
            buf.section(name, on_device=False)[:count] = value
        buf.tables(bucket, on_device=False).fill_(-1)
        buf.upload(bucket)
