"""The engine: continuous batching over a paged KV cache and a Mamba state slot pool.

`step()` is schedule -> execute -> update:
- schedule (Scheduler): which sequences run, with how many tokens, on which pages and slots;
- execute (ModelRunner): the forward passes and the sampling;
- update (here): publish full pages and take snapshots for the prefix cache, append tokens,
  detokenize, check stop conditions, emit TokenEvents, free the cache of finished sequences,
  resolve finished prefills.

Requests join and leave the running batch every step. Besides ordinary requests the engine
runs prefill-only requests for another engine (`prefill(request, sink)`) and takes in requests
prefilled elsewhere (`reserve(request)` -> DecodeReservation; see handoff.py), or prefills their
uncached rest itself when its prefix cache holds all but a few tokens (a local prefill).

What goes into the prefix cache (prefix_cache.py), and when, is snapshots.py's.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from typing import Any

from baton.workers.engine.allocator import PageAllocator, SlotPool
from baton.workers.engine.config import EngineConfig, EngineStats, StepTimings
from baton.workers.engine.handoff import CacheFull, PrefillAborted, PrefillResult, PrefillSink
from baton.workers.engine.prefix_cache import CacheKeys, PrefixCache, salt_key
from baton.workers.engine.request import Phase, Request, Sequence, TokenEvent
from baton.workers.engine.reservation import DecodeReservation
from baton.workers.engine.runner import ModelRunner, SampledToken, StepOutput
from baton.workers.engine.sampling import fresh_seed, request_seed
from baton.workers.engine.scheduler import Scheduler
from baton.workers.engine.sizing import size_caches
from baton.workers.engine.snapshots import SnapshotKeeper
from baton.workers.text.streaming import IncrementalDetokenizer, StopMatcher

log = logging.getLogger(__name__)


class Engine:
    """Continuous-batching engine for one model on one device."""

    def __init__(self, model: Any, config: EngineConfig, tokenizer: Any | None = None,
                 grammar_tokenizer: Any | None = None) -> None:
        """tokenizer: detokenize and match stop strings in the engine (None: the caller does);
        grammar_tokenizer: what grammars compile against (default: tokenizer)."""
        config.validate()
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        mcfg = model.config
        self.vocab_size = int(mcfg.vocab_size)
        model_len = int(getattr(model, "max_model_len", mcfg.max_position_embeddings))
        self.max_model_len = config.max_model_len or model_len
        if self.max_model_len > model_len:
            raise ValueError(
                f"EngineConfig.max_model_len={self.max_model_len} is invalid: the model's "
                f"context is {model_len} tokens"
            )
        self.k = config.speculative_tokens
        if self.k and model.num_mtp_layers == 0:
            raise ValueError(
                f"EngineConfig.speculative_tokens={self.k} is invalid: the model has no MTP "
                "layers (num_nextn_predict_layers = 0)"
            )
        if config.eos_token_ids is not None:
            eos = list(config.eos_token_ids)
        elif tokenizer is not None and getattr(tokenizer, "eos_token_ids", None):
            eos = list(tokenizer.eos_token_ids)
        else:
            raw = getattr(mcfg, "eos_token_id", None)
            eos = [] if raw is None else list(raw) if isinstance(raw, (list, tuple)) else [raw]
        self.eos_ids = frozenset(int(e) for e in eos)
        self.base_seed = config.base_seed if config.base_seed is not None else fresh_seed()

        # ssm_dtype None: the checkpoint's mamba_ssm_cache_dtype (float32 unless it says
        # otherwise), in the probe that sizes the caches and in the caches alike.
        self.sizes = sizes = size_caches(model, config, self.max_model_len)
        num_pages, num_slots = sizes.num_pages, sizes.num_slots
        self.cache = model.allocate_cache(
            num_pages, config.page_size, num_slots, spec_tokens=self.k,
            ssm_dtype=config.ssm_dtype
        )
        self.pages = PageAllocator(num_pages, config.page_size)
        self.slots = SlotPool(num_slots)
        self.prefix: PrefixCache | None = None
        if config.prefix_cache:
            self.prefix = PrefixCache(self.pages, self.cache, sizes.num_snapshots,
                                      int(mcfg.hidden_size))
        self.scheduler = Scheduler(
            self.pages, self.slots, config.max_num_seqs, config.max_batch_tokens, self.k,
            self.prefix, config.snapshot_interval
        )
        from baton.workers.model.graphs import StepGraphs  # torch/triton: not for the router

        graphs = None
        if not config.enforce_eager and StepGraphs.supports(model):
            graphs = StepGraphs(model, self.cache, config.max_num_seqs,
                                max_model_len=self.max_model_len, buckets=config.step_buckets)
        elif not config.enforce_eager and config.compile and \
                StepGraphs.supports(model, static=True):
            # The torch path's fixed-shape step, compiled per bucket now (not on a request).
            graphs = StepGraphs(model, self.cache, config.max_num_seqs,
                                max_model_len=self.max_model_len, compile=True,
                                buckets=config.step_buckets)
            graphs.warm_up()
        self.runner = ModelRunner(model, self.cache, self.k, config.spec_sampling, graphs,
                                  tokenizer=grammar_tokenizer or tokenizer, eos_ids=self.eos_ids)
        self.keeper: SnapshotKeeper | None = None
        if self.prefix is not None:
            self.keeper = SnapshotKeeper(self.prefix, self.runner, config.snapshot_interval)
        self.reservations: dict[str, DecodeReservation] = {}
        self._by_id: dict[str, Sequence] = {}
        self._deferred: list[TokenEvent] = []
        self._stats = EngineStats(num_pages=num_pages, num_slots=num_slots,
                                  num_snapshots=sizes.num_snapshots if self.prefix else 0)

    # ---- requests ------------------------------------------------------------------------

    def _check_request(self, request: Request) -> None:
        if not isinstance(request.request_id, str) or not request.request_id:
            raise ValueError(f"request_id={request.request_id!r} is invalid: a non-empty string")
        if request.request_id in self._by_id or request.request_id in self.reservations:
            raise ValueError(f"request_id={request.request_id!r} is already in this engine")
        request.sampling.validate()
        self.runner.logits.check_request(request)
        ids = request.prompt_ids
        if not ids:
            raise ValueError(f"prompt_ids of {request.request_id!r} is empty")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in ids):
            bad = next(t for t in ids if not (isinstance(t, int) and 0 <= t < self.vocab_size))
            raise ValueError(
                f"prompt_ids of {request.request_id!r} holds {bad!r}: token ids must be integers "
                f"in [0, {self.vocab_size})"
            )
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt of {request.request_id!r} has {len(ids)} tokens: longer than the "
                f"context allows (max_model_len={self.max_model_len}, which must leave room "
                "for at least one generated token)"
            )
        if request.sampling.stop and self.tokenizer is None:
            raise ValueError(
                f"stop={request.sampling.stop!r}: stop strings need an engine with a tokenizer"
            )

    def _new_sequence(self, request: Request, sink=None, on_prefilled=None,
                      sink_from: int = 0) -> Sequence:
        sp = request.sampling
        seq = Sequence(
            request=request,
            seed=sp.seed
            if sp.seed is not None
            else request_seed(self.base_seed, request.request_id),
            tokens=list(request.prompt_ids),
            num_prompt=len(request.prompt_ids),
            max_len=min(self.max_model_len, len(request.prompt_ids) + sp.max_tokens),
            eos_ids=frozenset() if sp.ignore_eos else self.eos_ids,
            sink=sink,
            sink_from=sink_from,
            on_prefilled=on_prefilled,
            added_at=time.monotonic(),
            cache_keys=CacheKeys(keys=[salt_key(request.cache_salt)]),
        )
        seq.needs_mtp = self.runner.needs_mtp(seq)
        if self.tokenizer is not None and sink is None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.tokens)
            seq.stop_matcher = StopMatcher(sp.stop)
        return seq

    def prepare(self, request: Request) -> None:
        """Compiles the request's grammar on the caller's thread, so that the engine's thread
        finds it compiled (EngineLoop calls this before queueing); ValueError if it cannot."""
        self.runner.logits.prepare(request)

    def add_request(self, request: Request) -> None:
        """Queue a request; it joins the running batch when the caches have room."""
        self._check_request(request)
        seq = self._new_sequence(request)
        self._by_id[request.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stop a request and free everything it holds; False if the engine does not know it.

        An aborted request's last event has finish_reason "abort" (token_id None).
        """
        if request_id in self.reservations:
            self.reservations[request_id].release()
            return True
        seq = self._by_id.get(request_id)
        if seq is None:
            return False
        self._finish(seq)
        if seq.sink is not None:
            if seq.on_prefilled is not None:
                self._resolve_prefill(seq, PrefillAborted(f"prefill of {request_id!r} aborted"))
        else:
            self._deferred.append(
                TokenEvent(
                    request_id,
                    None,
                    finish_reason="abort",
                    num_prompt_tokens=seq.num_prompt,
                    num_generated=seq.num_generated,
                )
            )
        self._count_finish("abort")
        return True

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self._deferred)

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        self._by_id.pop(seq.request_id, None)

    def _count_finish(self, reason: str) -> None:
        counts = self._stats.requests_finished_total
        counts[reason] = counts.get(reason, 0) + 1

    # ---- prefill for another engine ------------------------------------------------------

    def add_prefill(
        self,
        request: Request,
        sink: PrefillSink,
        on_done: Callable[[PrefillResult | BaseException], None],
        sink_from: int = 0,
    ) -> None:
        """Queue a prefill-only request: its state goes to sink, on_done gets the result.

        sink_from: the receiver already holds prompt tokens [0, sink_from) (KV and a Mamba
        snapshot there), so only the KV after them is sent, with the state at the end."""
        self._check_request(request)
        n = len(request.prompt_ids)
        if isinstance(sink_from, bool) or not isinstance(sink_from, int) or not (
                0 <= sink_from < n):
            raise ValueError(f"sink_from={sink_from!r} is invalid: the receiver must lack at "
                             f"least the last of the prompt's {n} tokens (0 <= sink_from < {n})")
        seq = self._new_sequence(request, sink=sink, on_prefilled=on_done, sink_from=sink_from)
        self._by_id[request.request_id] = seq
        self.scheduler.add(seq)

    def prefill(self, request: Request, sink: PrefillSink, sink_from: int = 0) -> PrefillResult:
        """Run a prompt for another engine (see handoff.py); steps until its first token.

        Other requests keep running meanwhile; their events come out of the next step().
        """
        box: list = []
        self.add_prefill(request, sink, box.append, sink_from)
        while not box:
            self._deferred.extend(self._step())
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    # ---- a request prefilled elsewhere ---------------------------------------------------

    def reserve(self, request: Request, local_prefill_max_tokens: int = 0
                ) -> DecodeReservation:
        """Room for a request whose prompt was (or will be) prefilled elsewhere.

        The longest prefix of the prompt this engine's prefix cache holds (KV and a Mamba
        snapshot) is pinned: `reservation.cached_tokens`. When it covers all but at most
        local_prefill_max_tokens of the prompt (or all of it), this engine prefills the rest
        itself at once (`reservation.local_prefill`: no state will arrive; the request is
        running). Otherwise the reservation waits for the state of tokens [cached_tokens, n)
        and the Mamba state at n (write / commit / release). CacheFull when there is no room.
        """
        self._check_request(request)
        if isinstance(local_prefill_max_tokens, bool) or not isinstance(
                local_prefill_max_tokens, int) or local_prefill_max_tokens < 0:
            raise ValueError(f"local_prefill_max_tokens={local_prefill_max_tokens!r} is "
                             "invalid: an integer >= 0 (0: never prefill locally)")
        sched = self.scheduler
        if len(sched.running) + sched.num_reserved >= self.config.max_num_seqs:
            raise CacheFull(f"{self.config.max_num_seqs} sequences are running or reserved")
        seq = self._new_sequence(request)
        n = len(request.prompt_ids)
        hit = sched.lookup(seq)
        local = hit is not None and n - hit.position <= local_prefill_max_tokens
        if hit is not None and hit.position == n:
            local = True  # nothing to prefill: no transfer at all
        # A local prefill grows its pages as it decodes; a transfer writes the prompt, the
        # first token and the drafts of a speculative step.
        total = self.pages.pages_for(n + 1 + (0 if local else self.k))
        need = sched.pages_to_admit(hit, total)
        if hit is not None and need > self.pages.num_free >= total:
            hit, local, need = None, False, total  # keeping the hit does not fit
        if self.slots.num_free == 0 or need > self.pages.num_free:
            raise CacheFull(
                f"no room for {n} tokens: {self.pages.num_free} free pages "
                f"(need {need}), {self.slots.num_free} free state slots"
            )
        sched.take_cache(seq, hit, total, restore_state=local)
        cached = hit.position if hit is not None else 0
        if local:
            self._stats.local_prefills_total += 1
            self._by_id[request.request_id] = seq
            sched.start_running(seq)
            if seq.uncached == 0:
                sched.pending_hits.append(seq)  # sampled from the snapshot next step
            return DecodeReservation(self, seq, n, cached, local=True)
        sched.num_reserved += 1
        res = DecodeReservation(self, seq, n, cached)
        self.reservations[request.request_id] = res
        return res

    def _end_reservation(self, res: DecodeReservation) -> None:
        self.reservations.pop(res.request_id, None)
        self.scheduler.num_reserved -= 1

    def _release_reserved(self, seq: Sequence) -> None:
        self.scheduler.free_cache(seq)
        seq.phase = Phase.FINISHED

    def _commit_reserved(self, seq: Sequence, first: SampledToken) -> None:
        seq.cached_len = seq.num_prompt
        self._by_id[seq.request_id] = seq
        self.scheduler.start_running(seq)
        # The state at the prompt's end arrived whole: publish it and snapshot it.
        if self.keeper is not None:
            self.keeper.prompt_arrived(seq)
        event = self._append(seq, first)
        self._deferred.append(event)
        if event.finished:
            self._finish(seq)
            self._count_finish(event.finish_reason)

    # ---- the step ------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """Run one scheduling step; the events of every request that moved."""
        events, self._deferred = self._deferred, []
        return events + self._step()

    def _step(self) -> list[TokenEvent]:
        t_start = time.perf_counter()
        plan = self.scheduler.schedule()
        t_sched = time.perf_counter()
        out = StepOutput()
        if not plan.empty:
            self.runner.run_hits(plan.hits, out)
            self.runner.run_chunks(plan.chunks, out)
            self.runner.run_speculative(plan.speculative, out)
        t_exec = time.perf_counter()
        events = self._update(plan, out)
        t_end = time.perf_counter()

        st = self._stats
        st.prompt_tokens_total += out.prompt_tokens
        st.spec_draft_tokens_total += out.draft_tokens
        st.spec_accepted_tokens_total += out.accepted_tokens
        if not plan.empty:
            st.steps_total += 1
            timing = StepTimings(
                schedule=t_sched - t_start,
                forward=out.forward_seconds,
                sample=out.sample_seconds,
                update=t_end - t_exec,
                total=t_end - t_start,
            )
            st.last_step = timing
            acc = st.step_seconds_total
            for name in ("schedule", "forward", "sample", "update", "total"):
                setattr(acc, name, getattr(acc, name) + getattr(timing, name))
        return events

    def _update(self, plan, out: StepOutput) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        seqs = list({id(s): s for s in [c.seq for c in plan.chunks] + plan.speculative
                     + plan.hits}.values())
        if self.keeper is not None:
            self.keeper.after_step(plan, seqs)
        finished: list[tuple[Sequence, TokenEvent]] = []
        for seq in seqs:
            if seq.phase != Phase.RUNNING:
                continue
            if seq.sink is not None:
                self._update_prefill(seq, out)
                continue
            for sampled in out.tokens.get(id(seq), []):
                event = self._append(seq, sampled)
                events.append(event)
                if event.finished:
                    finished.append((seq, event))
                    break
        if self.keeper is not None:
            self.keeper.requests_ended(
                [s for s, e in finished if e.finish_reason in ("stop", "length")])
        for seq, event in finished:
            self._finish(seq)
            self._count_finish(event.finish_reason)
        return events

    def _resolve_prefill(self, seq: Sequence, outcome: PrefillResult | BaseException) -> None:
        try:
            seq.on_prefilled(outcome)
        except Exception:  # a broken callback must not take the other requests down
            log.exception("prefill callback of %s failed", seq.request_id)

    def _update_prefill(self, seq: Sequence, out: StepOutput) -> None:
        error = out.sink_errors.get(id(seq))
        sampled = out.tokens.get(id(seq))
        if error is None and not sampled:
            return
        self._finish(seq)
        if error is not None:
            self._count_finish("abort")
            self._resolve_prefill(seq, error)
            return
        first = sampled[0]
        self._stats.generation_tokens_total += 1
        reason = self._finish_reason(seq, first.token, len(seq.tokens) + 1)
        self._count_finish("prefilled")
        self._resolve_prefill(
            seq,
            PrefillResult(
                request_id=seq.request_id,
                first_token=first.token,
                logprob=first.logprob,
                top_logprobs=first.top_logprobs,
                num_prompt_tokens=seq.num_prompt,
                finish_reason=reason,
                prefill_seconds=time.monotonic() - seq.added_at,
                cached_tokens=seq.cached_tokens,
            ),
        )

    def _finish_reason(self, seq: Sequence, token: int, length: int) -> str | None:
        if token in seq.eos_ids or token in seq.sampling.stop_token_ids:
            return "stop"
        if self.runner.logits.grammar_complete(seq, token, length):
            return "grammar_error" if self.runner.logits.grammar_refused(seq) else "stop"
        if length >= seq.max_len:
            return "length"
        return None

    def _append(self, seq: Sequence, sampled: SampledToken) -> TokenEvent:
        """Add one generated token to seq; the event it makes (finished or not)."""
        seq.tokens.append(sampled.token)
        self._stats.generation_tokens_total += 1
        reason = self._finish_reason(seq, sampled.token, len(seq.tokens))
        text = ""
        if seq.detokenizer is not None:
            text, stopped = seq.stop_matcher.feed(seq.detokenizer.add(sampled.token))
            if stopped:
                reason = "stop"
            elif reason is not None:
                text += seq.stop_matcher.feed(seq.detokenizer.flush())[0]
                text += seq.stop_matcher.flush()
        return TokenEvent(
            request_id=seq.request_id,
            token_id=sampled.token,
            logprob=sampled.logprob,
            top_logprobs=sampled.top_logprobs,
            text_delta=text,
            finish_reason=reason,
            num_prompt_tokens=seq.num_prompt,
            num_generated=seq.num_generated,
        )

    # ---- stats ---------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        st = self._stats
        sched = self.scheduler
        st.waiting = len(sched.waiting)
        st.running = len(sched.running)
        st.reserved = sched.num_reserved
        st.kv_cache_usage = self.pages.usage
        st.ssm_slot_usage = self.slots.usage
        st.free_pages = self.pages.num_free
        st.free_slots = self.slots.num_free
        st.preemptions_total = sched.preemptions_total
        if self.prefix is not None:
            pc = self.prefix.report()
            st.prefix_queried_tokens_total = pc.queried_tokens_total
            st.prefix_hit_tokens_total = pc.hit_tokens_total
            st.cached_pages = pc.cached_pages
            st.snapshots = pc.snapshots
            st.snapshot_usage = self.prefix.snapshot_usage()
            st.snapshot_evictions_total = pc.snapshot_evictions_total
            st.page_evictions_total = pc.page_evictions_total
        # A copy: the exporter reads it on another thread while the engine keeps counting.
        return copy.deepcopy(st)
