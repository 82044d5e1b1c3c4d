"""Engine configuration and the statistics the engine reports."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineConfig:
    """How an Engine sizes its caches and batches. Validated by `validate(model)`."""

    page_size: int = 16
    """Tokens per KV cache page."""
    num_pages: int | None = None
    """KV pages; None: sized from cache_memory_bytes."""
    num_slots: int | None = None
    """Mamba state slots (one per live sequence); None: max_num_seqs."""
    cache_memory_bytes: int | None = None
    """Memory budget for both caches when num_pages is None (slots are taken out first)."""
    max_num_seqs: int = 64
    """Most sequences in the running batch."""
    max_batch_tokens: int = 2048
    """Tokens one step feeds to the model (decode tokens first, then prefill chunks)."""
    max_model_len: int | None = None
    """Longest sequence (prompt + output); None: the model's max_position_embeddings."""
    speculative_tokens: int = 0
    """MTP draft tokens per decode step; 0 turns speculative decoding off."""
    spec_sampling: str = "coupled"
    """How sampled (temperature > 0) drafts are verified. "coupled": a draft is kept iff it
    equals the target's own token at that position (drawn with the same counter-based noise),
    so output is token-for-token the output without speculation. "rejection": the standard
    speculative-sampling rule (accept with min(1, p/q), else resample max(p - q, 0)); same
    distribution, more drafts accepted, but tokens differ from non-speculative decoding."""
    eos_token_ids: list[int] | None = None
    """Tokens that finish a request; None: the tokenizer's, else the model config's."""
    base_seed: int | None = None
    """Seeds requests without their own seed (hashed with the request id); None: random.
    Expert-parallel ranks, which must sample alike, share one."""
    ssm_dtype: object | None = None
    """SSM state dtype (a torch.dtype); None: the model's mamba_ssm_cache_dtype (float32)."""
    enforce_eager: bool = False
    """True: every forward runs eagerly (compile included). False: decode and MTP-verify
    steps run from preallocated buffers per batch-size bucket, replayed as CUDA graphs on a GPU
    (workers/model/graphs.py; only with the kernels' path, without expert parallelism)."""
    compile: bool = False
    """True: on the torch path (no Triton kernels: the CPU), decode, MTP-verify and MTP-draft
    steps run from the same buckets as one torch.compile'd (inductor) function each, all
    compiled when the Engine is built (workers/model/graphs.py, static_step.py); False: they
    run eagerly. The served worker's default is the Model spec's engine.compile."""
    step_buckets: list[int] | None = None
    """Batch sizes that get their own step (graph or compiled function); a batch runs in the
    smallest that holds it, above the largest eagerly. None: 1, 2, 4, ... up to max_num_seqs.
    Fewer buckets: less to compile at start, more padded rows per step."""
    prefix_cache: bool = True
    """Keep finished prefixes (KV pages and Mamba snapshots) for later requests to hit."""
    num_snapshots: int | None = None
    """Mamba snapshot rows of the prefix cache; None: snapshot_memory_fraction of
    cache_memory_bytes, or num_slots when num_pages is given."""
    snapshot_memory_fraction: float = 0.25
    """Share of cache_memory_bytes the Mamba snapshots take (with num_snapshots None)."""
    snapshot_interval: int = 1024
    """Snapshot every this many tokens inside long prompts (prefill chunks end there), besides
    prompt and request ends; 0: only at prompt and request ends. A multiple of page_size."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""

        def check_int(name: str, value: object, low: int, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(
                    f"EngineConfig.{name}={value!r} is invalid: must be an integer "
                    f">= {low}{' or None' if allow_none else ''}"
                )

        check_int("page_size", self.page_size, 1)
        check_int("num_pages", self.num_pages, 1, allow_none=True)
        check_int("num_slots", self.num_slots, 1, allow_none=True)
        check_int("cache_memory_bytes", self.cache_memory_bytes, 1, allow_none=True)
        check_int("max_num_seqs", self.max_num_seqs, 1)
        check_int("max_batch_tokens", self.max_batch_tokens, 1)
        check_int("max_model_len", self.max_model_len, 2, allow_none=True)
        check_int("speculative_tokens", self.speculative_tokens, 0)
        check_int("base_seed", self.base_seed, 0, allow_none=True)
        check_int("num_snapshots", self.num_snapshots, 0, allow_none=True)
        check_int("snapshot_interval", self.snapshot_interval, 0)
        if not isinstance(self.prefix_cache, bool):
            raise ValueError(f"EngineConfig.prefix_cache={self.prefix_cache!r} is invalid: "
                             "true or false")
        fraction = self.snapshot_memory_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
                0 < fraction < 1):
            raise ValueError(f"EngineConfig.snapshot_memory_fraction={fraction!r} is invalid: "
                             "a number in (0, 1)")
        if self.snapshot_interval % self.page_size:
            raise ValueError(f"EngineConfig.snapshot_interval={self.snapshot_interval} is "
                             f"invalid: a multiple of page_size ({self.page_size}), or 0")
        if self.base_seed is not None and self.base_seed >= 1 << 64:
            raise ValueError(f"EngineConfig.base_seed={self.base_seed} is invalid: < 2**64")
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(
                f"EngineConfig.enforce_eager={self.enforce_eager!r} is invalid: True or False"
            )
        if self.step_buckets is not None:
            from baton.workers.model.graphs import check_buckets

            try:
                check_buckets(self.step_buckets, self.max_num_seqs)
            except ValueError as err:
                raise ValueError(f"EngineConfig.step_buckets={self.step_buckets!r} is invalid: "
                                 f"{str(err).split(': ', 1)[1]}") from None
        if not isinstance(self.compile, bool):
            raise ValueError(f"EngineConfig.compile={self.compile!r} is invalid: True or False")
        if self.spec_sampling not in ("coupled", "rejection"):
            raise ValueError(
                f"EngineConfig.spec_sampling={self.spec_sampling!r} is invalid: "
                "'coupled' or 'rejection'"
            )
        if self.num_pages is None and self.cache_memory_bytes is None:
            raise ValueError("EngineConfig: give num_pages or cache_memory_bytes")
        if self.max_batch_tokens < 1 + self.speculative_tokens:
            raise ValueError(
                f"EngineConfig.max_batch_tokens={self.max_batch_tokens} is invalid: must be at "
                f"least 1 + speculative_tokens ({1 + self.speculative_tokens})"
            )


@dataclass
class StepTimings:
    """Seconds spent in the parts of one engine step."""

    schedule: float = 0.0
    forward: float = 0.0
    """Model forward passes (main, MTP drafts and verification)."""
    sample: float = 0.0
    update: float = 0.0
    total: float = 0.0


@dataclass
class EngineStats:
    """A snapshot of the engine's load and counters (the metrics exporter reads this)."""

    waiting: int = 0
    running: int = 0
    reserved: int = 0
    """Handoff reservations holding cache but not yet committed."""
    kv_cache_usage: float = 0.0
    """Share of KV pages in use, 0..1."""
    ssm_slot_usage: float = 0.0
    """Share of Mamba state slots in use, 0..1."""
    num_pages: int = 0
    free_pages: int = 0
    num_slots: int = 0
    free_slots: int = 0
    prompt_tokens_total: int = 0
    """Prompt tokens run through the model (recomputed ones included)."""
    generation_tokens_total: int = 0
    spec_draft_tokens_total: int = 0
    spec_accepted_tokens_total: int = 0
    requests_finished_total: dict[str, int] = field(default_factory=dict)
    """Finished requests by finish reason."""
    preemptions_total: int = 0
    prefix_queried_tokens_total: int = 0
    """Prompt tokens looked up in the prefix cache (at admission and reservation)."""
    prefix_hit_tokens_total: int = 0
    """Of those, tokens served from the cache instead of computed."""
    cached_pages: int = 0
    """Published KV pages nobody holds (reusable by a later hit)."""
    num_snapshots: int = 0
    """Rows of the Mamba snapshot pool."""
    snapshots: int = 0
    """Snapshots held."""
    snapshot_usage: float = 0.0
    """snapshots / num_snapshots, 0..1."""
    snapshot_evictions_total: int = 0
    page_evictions_total: int = 0
    """Cached pages reused for fresh ones."""
    local_prefills_total: int = 0
    """Reservations whose uncached rest this engine prefilled itself (no transfer)."""
    steps_total: int = 0
    last_step: StepTimings = field(default_factory=StepTimings)
    step_seconds_total: StepTimings = field(default_factory=StepTimings)
