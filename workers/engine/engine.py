"""The engine: continuous batching over a paged KV cache and a Mamba state slot pool.

`step()` is schedule -> execute -> update:
- schedule (Scheduler): which sequences run, with how many tokens, on which pages and slots;
- execute (ModelRunner): the forward passes and the sampling;
- update (here): append tokens, detokenize, check stop conditions, emit TokenEvents, free the
  cache of finished sequences, resolve finished prefills.

Requests join and leave the running batch every step. Besides ordinary requests the engine
runs prefill-only requests for another engine (`prefill(request, sink)`) and takes in requests
prefilled elsewhere (`reserve(request, n_tokens)` -> Reservation; see handoff.py).
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
from baton.workers.engine.request import Phase, Request, Sequence, TokenEvent
from baton.workers.engine.reservation import Reservation
from baton.workers.engine.runner import ModelRunner, SampledToken, StepOutput
from baton.workers.engine.sampling import fresh_seed, request_seed
from baton.workers.engine.scheduler import Scheduler
from baton.workers.engine.tokenizer import IncrementalDetokenizer, StopMatcher

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

        # None: the checkpoint's mamba_ssm_cache_dtype (float32 unless it says otherwise).
        ssm_dtype = config.ssm_dtype
        num_slots = config.num_slots or config.max_num_seqs
        num_pages = config.num_pages
        if num_pages is None:
            probe = model.allocate_cache(
                1, config.page_size, 1, spec_tokens=self.k, ssm_dtype=ssm_dtype
            )
            per_page, per_slot = probe.bytes_per_page(), probe.bytes_per_slot()
            del probe
            left = config.cache_memory_bytes - num_slots * per_slot
            num_pages = left // per_page if per_page else 1 << 20
            if left <= 0 or num_pages < 1:
                raise ValueError(
                    f"EngineConfig.cache_memory_bytes={config.cache_memory_bytes} is invalid: "
                    f"{num_slots} state slots take {num_slots * per_slot} bytes, leaving no "
                    f"room for KV pages of {per_page} bytes"
                )
        # One request of max_model_len tokens (plus drafts) must fit alone, so that admission
        # and preemption always make progress.
        need = -(-(self.max_model_len + self.k + 1) // config.page_size)
        if num_pages < need:
            raise ValueError(
                f"EngineConfig: {num_pages} KV pages of {config.page_size} tokens cannot hold "
                f"one sequence of max_model_len={self.max_model_len} tokens (+{self.k} drafts); "
                f"give at least {need} pages (num_pages / cache_memory_bytes) or lower "
                "max_model_len"
            )
        self.cache = model.allocate_cache(
            num_pages, config.page_size, num_slots, spec_tokens=self.k, ssm_dtype=ssm_dtype
        )
        self.pages = PageAllocator(num_pages, config.page_size)
        self.slots = SlotPool(num_slots)
        self.scheduler = Scheduler(
            self.pages, self.slots, config.max_num_seqs, config.max_batch_tokens, self.k
        )
        from baton.workers.model.graphs import StepGraphs  # torch/triton: not for the router

        graphs = None
        if not config.enforce_eager and StepGraphs.supports(model):
            graphs = StepGraphs(model, self.cache, config.max_num_seqs,
                                max_model_len=self.max_model_len)
        self.runner = ModelRunner(model, self.cache, self.k, config.spec_sampling, graphs,
                                  tokenizer=grammar_tokenizer or tokenizer, eos_ids=self.eos_ids)
        self.reservations: dict[str, Reservation] = {}
        self._by_id: dict[str, Sequence] = {}
        self._deferred: list[TokenEvent] = []
        self._stats = EngineStats(num_pages=num_pages, num_slots=num_slots)

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

    def _new_sequence(self, request: Request, sink=None, on_prefilled=None) -> Sequence:
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
            on_prefilled=on_prefilled,
            added_at=time.monotonic(),
        )
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
    ) -> None:
        """Queue a prefill-only request: its state goes to sink, on_done gets the result."""
        self._check_request(request)
        seq = self._new_sequence(request, sink=sink, on_prefilled=on_done)
        self._by_id[request.request_id] = seq
        self.scheduler.add(seq)

    def prefill(self, request: Request, sink: PrefillSink) -> PrefillResult:
        """Run a prompt for another engine (see handoff.py); steps until its first token.

        Other requests keep running meanwhile; their events come out of the next step().
        """
        box: list = []
        self.add_prefill(request, sink, box.append)
        while not box:
            self._deferred.extend(self._step())
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    # ---- a request prefilled elsewhere ---------------------------------------------------

    def reserve(self, request: Request, n_tokens: int) -> Reservation:
        """Take a slot and pages for a request whose n_tokens of prompt state will arrive."""
        self._check_request(request)
        if n_tokens != len(request.prompt_ids):
            raise ValueError(
                f"n_tokens={n_tokens} is invalid: the state covers the whole prompt of "
                f"{len(request.prompt_ids)} tokens"
            )
        sched = self.scheduler
        if len(sched.running) + sched.num_reserved >= self.config.max_num_seqs:
            raise CacheFull(f"{self.config.max_num_seqs} sequences are running or reserved")
        pages = self.pages.pages_for(n_tokens + 1 + self.k)
        if self.slots.num_free == 0 or pages > self.pages.num_free:
            raise CacheFull(
                f"no room for {n_tokens} tokens: {self.pages.num_free} free pages "
                f"(need {pages}), {self.slots.num_free} free state slots"
            )
        seq = self._new_sequence(request)
        seq.slot = self.slots.allocate_one()
        seq.pages = self.pages.allocate(pages)
        sched.num_reserved += 1
        res = Reservation(self, seq, n_tokens)
        self.reservations[request.request_id] = res
        return res

    def _end_reservation(self, res: Reservation) -> None:
        self.reservations.pop(res.request_id, None)
        self.scheduler.num_reserved -= 1

    def _release_reserved(self, seq: Sequence) -> None:
        self.scheduler.free_cache(seq)
        seq.phase = Phase.FINISHED

    def _commit_reserved(self, seq: Sequence, first: SampledToken) -> None:
        seq.cached_len = seq.num_prompt
        self._by_id[seq.request_id] = seq
        self.scheduler.start_running(seq)
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
        seqs = [c.seq for c in plan.chunks] + plan.speculative
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
                    self._finish(seq)
                    self._count_finish(event.finish_reason)
                    break
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
            ),
        )

    def _finish_reason(self, seq: Sequence, token: int, length: int) -> str | None:
        if token in seq.eos_ids or token in seq.sampling.stop_token_ids:
            return "stop"
        if self.runner.logits.grammar_complete(seq, token, length):
            return "stop"
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
        # A copy: the exporter reads it on another thread while the engine keeps counting.
        return copy.deepcopy(st)
