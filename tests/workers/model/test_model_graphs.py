"""StepGraphs: decode and verify steps from preallocated buffers per batch-size bucket. On the
CPU the buckets run eagerly under the Triton interpreter (the same buffers and plans a GPU
replays): padded rows change no real row and no cache row, a bucket reused after a larger
batch is clean, the launched part reads nothing back to the host, and the engine knob turns
it off. On a GPU: graphs on and off give the same greedy tokens, with no sync in the step."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from baton.workers.engine import Engine, EngineConfig, Request, SamplingParams
from baton.workers.model import ForwardBatch, load_model
from baton.workers.model.checkpoint import write_random_checkpoint
from baton.workers.model.graphs import StepGraphs, StepKind, batch_buckets, bucket_for

PAGE, SPEC = 4, 2
HIDDEN, VOCAB = 32, 64  # small_hybrid_config's hidden_size and vocab_size
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, small_hybrid_config):
    return write_random_checkpoint(tmp_path_factory.mktemp("graphs"), small_hybrid_config,
                                   seed=5, dtype=torch.float32, tokenizer=False)


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint, dtype=torch.float32, device=DEVICE, kernels="triton")


def rel_err(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def batch_of(lens, cached, slots, tables, verify=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return ForwardBatch(
        input_ids=torch.randint(3, VOCAB, (sum(lens),), generator=gen),
        positions=torch.cat([torch.arange(c, c + n) for n, c in zip(lens, cached)]),
        seq_lens=list(lens), cached_lens=list(cached),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        state_slots=torch.tensor(slots), spec_verify=verify)


TABLES = [[5, 1, 9, 3], [2, 14, 0, 8], [4, 6, 7, 10], [11, 12, 13, 15]]


def warm(model, cache, slots):
    """Prompts of 5, 3, 6 (and 2) tokens in the slots (chunks of 4), so the steps after them
    continue real state."""
    lens = [5, 3, 6, 2][:len(slots)]
    model.forward_batch(batch_of(lens, [0] * len(lens), slots, TABLES[:len(lens)]), cache)
    return lens


def test_buckets_are_powers_of_two_up_to_max_num_seqs():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert [bucket_for(n, batch_buckets(12)) for n in (1, 3, 5, 9, 12, 13)] == [1, 4, 8, 12, 12,
                                                                                 None]
    with pytest.raises(ValueError, match="max_num_seqs"):
        batch_buckets(0)


def cache_state(cache):
    return {name: {k: t.clone() for k, t in getattr(cache, name).items()}
            for name in ("_k", "_v", "_conv", "_ssm")}


def assert_same_caches(a, b, tol=1e-5):
    for name in a:
        for layer in a[name]:
            got, want = a[name][layer].float(), b[name][layer].float()
            scale = max(1.0, float(want.abs().max()))
            assert float((got - want).abs().max()) <= tol * scale, (name, layer)


def test_padded_decode_rows_change_no_real_row_or_cache_row(model):
    """Four sequences fill bucket 4; then three in the same bucket give the unpadded step's
    hidden states and caches: the padded fourth row, its buffers still holding the step
    before, writes neither its slot nor its pages."""
    slots = [2, 0, 3, 1]
    eager, bucketed = (model.allocate_cache(16, PAGE, 5, spec_tokens=SPEC) for _ in range(2))
    lens = warm(model, eager, slots)
    warm(model, bucketed, slots)
    graphs = StepGraphs(model, bucketed, max_num_seqs=4)
    for batch in (batch_of([1] * 4, lens, slots, TABLES, seed=3),
                  batch_of([1] * 3, [n + 1 for n in lens[:3]], slots[:3], TABLES[:3], seed=4)):
        assert graphs.kind_of(batch) is StepKind.DECODE
        want = model.forward_batch(batch, eager)
        got = graphs.forward_batch(batch)
        assert got.shape == want.shape == (len(batch.seq_lens), HIDDEN)
        assert rel_err(model.compute_logits(got), model.compute_logits(want)) <= 1e-5
        assert_same_caches(cache_state(bucketed), cache_state(eager))
    assert graphs.replays == 2 and list(graphs._steps) == [(StepKind.DECODE, 4)]


def test_padded_verify_rows_change_no_real_row_and_accept_agrees(model):
    """A verification of 1 + 2, 1 + 1 and 1 + 0 tokens in bucket 4 (12 token rows)."""
    slots = [2, 0, 3]
    eager, bucketed = (model.allocate_cache(16, PAGE, 5, spec_tokens=SPEC) for _ in range(2))
    lens = warm(model, eager, slots)
    warm(model, bucketed, slots)
    graphs = StepGraphs(model, bucketed, max_num_seqs=4)
    batch = batch_of([3, 2, 1], lens, slots, TABLES[:3], verify=True, seed=7)
    assert graphs.kind_of(batch) is StepKind.VERIFY
    want = model.forward_batch(batch, eager)
    got = graphs.forward_batch(batch)
    assert got.shape == (6, HIDDEN)
    assert rel_err(model.compute_logits(got), model.compute_logits(want)) <= 1e-5
    for cache in (eager, bucketed):
        cache.accept(torch.tensor(slots), torch.tensor([2, 2, 1]))
    assert_same_caches(cache_state(bucketed), cache_state(eager))


def test_padded_draft_rows_change_no_real_row(model):
    """The MTP depth's first forward of a step (1 + 2, 1 + 0, 1 + 1 entries) and a chained
    draft (one entry each), in bucket 4, against the eager MTP forward."""
    slots = [2, 0, 3]
    eager, bucketed = (model.allocate_cache(16, PAGE, 5, spec_tokens=SPEC) for _ in range(2))
    graphs = StepGraphs(model, bucketed, max_num_seqs=4)
    gen = torch.Generator().manual_seed(9)
    for lens, cached in (([3, 1, 2], [0, 0, 0]), ([1, 1, 1], [3, 1, 2])):
        batch = batch_of(lens, cached, slots, TABLES[:3], seed=sum(cached))
        assert graphs.draft_kind_of(batch) is (StepKind.DRAFT if max(lens) == 1
                                               else StepKind.DRAFT_ENTRIES)
        hidden = torch.randn(sum(lens), HIDDEN, generator=gen).to(DEVICE)
        want = model.mtp_forward(hidden, batch.input_ids, batch, eager)
        got = graphs.mtp_forward(hidden, batch.input_ids, batch)
        assert rel_err(model.compute_logits(got), model.compute_logits(want)) <= 1e-5
        assert_same_caches(cache_state(bucketed), cache_state(eager))
    assert graphs.replays == 2


def test_other_batches_run_eagerly(model):
    cache = model.allocate_cache(16, PAGE, 5, spec_tokens=SPEC)
    graphs = StepGraphs(model, cache, max_num_seqs=2)
    prompt = batch_of([5, 1], [0, 0], [0, 1], TABLES[:2])
    assert graphs.kind_of(prompt) is None  # a prompt chunk: the prefill kernels, eagerly
    calls = []
    graphs.forward_batch(prompt, on_layer_done=calls.append)
    assert calls == [0, 1, 2] and graphs.replays == 0
    three = batch_of([1, 1, 1], [5, 1, 0], [0, 1, 2], TABLES[:3])
    assert graphs.kind_of(three) is None  # more sequences than the largest bucket
    with pytest.raises(ValueError, match="state_slots"):  # the host check, before launch
        graphs.forward_batch(batch_of([1, 1], [5, 1], [0, 0], TABLES[:2]))
    short = StepGraphs(model, cache, max_num_seqs=2, max_model_len=4)  # 2 pages of 4 per row
    with pytest.raises(ValueError, match="max_model_len"):
        short.forward_batch(batch_of([1, 1], [12, 1], [0, 1], TABLES[:2]))


class SyncCalls(TorchFunctionMode):
    """Records every tensor call that reads a tensor back to the host (or waits for it):
    .item(), .tolist(), .cpu(), .numpy(), bool()/int()/float() of a tensor, nonzero. Calls
    from Triton's interpreter are not the step's: on a GPU the kernels run there, and the
    interpreter copies their arguments to emulate them."""

    NAMES = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__",
             "__index__", "nonzero", "synchronize"}

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES:
            frame = sys._getframe(1)
            where = frame.f_code.co_filename
            if "triton" not in where.replace("\\", "/").split("/site-packages/")[-1]:
                self.calls.append(f"{name} at {where}:{frame.f_lineno}")
        return func(*args, **(kwargs or {}))


def test_the_launched_step_reads_nothing_back(model):
    slots = [2, 0, 3]
    cache = model.allocate_cache(16, PAGE, 5, spec_tokens=SPEC)
    lens = warm(model, cache, slots)
    graphs = StepGraphs(model, cache, max_num_seqs=4)
    decode = batch_of([1, 1, 1], lens, slots, TABLES[:3], seed=2)
    graphs.forward_batch(decode)  # builds the bucket
    for kind, batch in ((StepKind.DECODE, batch_of([1, 1, 1], [n + 1 for n in lens], slots,
                                                   TABLES[:3], seed=3)),
                        (StepKind.VERIFY, batch_of([3, 1, 2], [n + 2 for n in lens], slots,
                                                   TABLES[:3], verify=True, seed=4))):
        graphs.forward_batch(batch)  # builds the bucket (the eager warm-up may read back)
        graphs.stage(batch, kind, 4)
        with SyncCalls() as mode:
            graphs.launch(kind, 4)
        assert mode.calls == [], mode.calls
    # The double does see what a sync looks like.
    with SyncCalls() as mode:
        bool(cache.mamba_state(0)[1].sum() > 0)
    assert mode.calls


def test_engine_knob_and_the_torch_path_turn_buckets_off(checkpoint, model):
    config = dict(page_size=PAGE, num_pages=32, max_num_seqs=4, max_model_len=64)
    assert isinstance(Engine(model, EngineConfig(**config)).runner.step_graphs, StepGraphs)
    assert Engine(model, EngineConfig(**config, enforce_eager=True)).runner.step_graphs is None
    reference = load_model(checkpoint, dtype=torch.float32, device=DEVICE, kernels="torch")
    assert Engine(reference, EngineConfig(**config)).runner.step_graphs is None
    # On the torch path the buckets run the fixed-shape step (static_step.py); CUDA graphs
    # replay only the kernels'.
    assert StepGraphs(reference, reference.allocate_cache(8, PAGE, 2), 2).static
    with pytest.raises(ValueError, match="capture"):
        StepGraphs(reference, reference.allocate_cache(8, PAGE, 2), 2, capture=True)
    with pytest.raises(ValueError, match="EngineConfig.compile"):
        EngineConfig(**config, compile=1).validate()
    for bad in ([2, 1], [0, 4], [1, 8], []):
        with pytest.raises(ValueError, match=r"EngineConfig.step_buckets=.*ascending"):
            EngineConfig(**config, step_buckets=bad).validate()
    assert StepGraphs(model, model.allocate_cache(8, PAGE, 2), 4, buckets=[1, 3]).buckets == [1, 3]
    with pytest.raises(ValueError, match="EngineConfig.enforce_eager"):
        EngineConfig(**config, enforce_eager="yes").validate()


def greedy_run(model, enforce_eager, speculative_tokens, **config):
    engine = Engine(model, EngineConfig(page_size=PAGE, num_pages=48, max_num_seqs=4,
                                        max_batch_tokens=32, max_model_len=64,
                                        speculative_tokens=speculative_tokens,
                                        enforce_eager=enforce_eager, base_seed=0, **config))
    gen = torch.Generator().manual_seed(11)
    for i, n in enumerate((7, 12, 3)):
        engine.add_request(Request(f"r{i}", torch.randint(3, 64, (n,), generator=gen).tolist(),
                                   SamplingParams(max_tokens=12, temperature=0,
                                                  ignore_eos=True)))
    out: dict[str, list[int]] = {}
    while engine.has_work():
        for ev in engine.step():
            if ev.token_id is not None:
                out.setdefault(ev.request_id, []).append(ev.token_id)
    return out, engine


@pytest.mark.gpu
@pytest.mark.parametrize("speculative_tokens", [0, 2])
def test_gpu_graphs_on_and_off_give_the_same_greedy_tokens(model, speculative_tokens):
    eager, _ = greedy_run(model, True, speculative_tokens)
    graphed, engine = greedy_run(model, False, speculative_tokens)
    assert graphed == eager
    graphs = engine.runner.step_graphs
    kind = StepKind.VERIFY if speculative_tokens else StepKind.DECODE
    assert graphs.replays > 0 and any(k is kind for k, _ in graphs.captured)


@pytest.mark.gpu
def test_gpu_graphed_step_does_not_sync(model):
    slots = [2, 0, 3]
    cache = model.allocate_cache(16, PAGE, 5, spec_tokens=SPEC)
    lens = warm(model, cache, slots)
    graphs = StepGraphs(model, cache, max_num_seqs=4)
    graphs.forward_batch(batch_of([1, 1, 1], lens, slots, TABLES[:3]))  # captures bucket 4
    torch.cuda.synchronize()
    batch = batch_of([1, 1, 1], [n + 1 for n in lens], slots, TABLES[:3], seed=1)
    torch.cuda.set_sync_debug_mode("error")
    try:
        graphs.forward_batch(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert graphs.captured == [(StepKind.DECODE, 4)]


# ---------------------------------------------------------------- the compiled torch path


@pytest.fixture(scope="module")
def torch_model(checkpoint):
    return load_model(checkpoint, dtype=torch.float32, device="cpu", kernels="torch")


@pytest.fixture(scope="module")
def compiled(torch_model):
    """Bucket 4 of every kind (1 to 4 sequences run in it, the rest padded), compiled
    (inductor) and warmed up on inert rows: one bucket keeps the compile time of the tests
    small; what differs between buckets is only the shapes inductor specializes on."""
    cache = torch_model.allocate_cache(16, PAGE, 5, spec_tokens=SPEC)
    graphs = StepGraphs(torch_model, cache, max_num_seqs=4, compile=True, buckets=[4])
    graphs.warm_up()
    assert graphs.compiles == 4 and graphs.recompiles == 0
    assert {kind for kind, _ in graphs._steps} == set(StepKind)
    return graphs


def reset(graphs):
    """The compiled graphs' cache back to zeros (the compiled steps read it in place)."""
    for tensors in graphs.cache._with_scratch.values():
        for t in tensors:
            t.zero_()
    graphs.cache._pending = [0] * graphs.cache.num_slots


@pytest.mark.timeout(1800)  # compiling under a loaded host; bounds a hang only
def test_compiled_steps_match_eager_in_every_bucket_with_padded_rows_inert(
        torch_model, compiled, logits_close):
    """Decode of 1, 2 and 3 sequences in bucket 4 (padded rows), verifications of 1 + K
    tokens and fewer, the MTP depth's entries and chained drafts, against the eager torch
    path: fp32 logits within 1e-4 and greedy tokens equal under the margin rule; the caches
    (padded rows write only the scratch row) equal after every step; no recompile, though
    the page tables the steps read widen as the sequences grow."""
    reset(compiled)
    model, slots = torch_model, [2, 0, 3]
    eager = model.allocate_cache(16, PAGE, 5, spec_tokens=SPEC)
    lens = warm(model, eager, slots)
    warm(model, compiled.cache, slots)

    def check(want, got):
        logits_close(model.compute_logits(got), model.compute_logits(want))
        assert_same_caches(cache_state(compiled.cache), cache_state(eager))

    seen, seed = set(), 20
    for n in (1, 2, 3):  # the contexts grow; the verifications cross page boundaries
        batch = batch_of([1] * n, lens[:n], slots[:n], TABLES[:n], seed=seed)
        check(model.forward_batch(batch, eager), compiled.forward_batch(batch))
        seen.add(compiled.kind_of(batch))
        lens = [c + 1 for c in lens[:n]] + lens[n:]
        seed += 1
    for seqs in ([3], [2, 3], [3, 2, 1]):
        n = len(seqs)
        batch = batch_of(seqs, lens[:n], slots[:n], TABLES[:n], verify=True, seed=seed)
        check(model.forward_batch(batch, eager), compiled.forward_batch(batch))
        accepted = torch.tensor([min(2, s) for s in seqs])
        for cache in (eager, compiled.cache):
            cache.accept(torch.tensor(slots[:n]), accepted)
        assert_same_caches(cache_state(compiled.cache), cache_state(eager))
        lens = [c + int(a) for c, a in zip(lens[:n], accepted)] + lens[n:]
        seed += 1
    gen = torch.Generator().manual_seed(9)
    for entries, cached in (([3, 1, 2], [0, 0, 0]), ([1, 1, 1], [3, 1, 2]), ([2], [4])):
        n = len(entries)
        batch = batch_of(entries, cached, slots[:n], TABLES[:n], seed=seed)
        hidden = torch.randn(sum(entries), HIDDEN, generator=gen)
        check(model.mtp_forward(hidden, batch.input_ids, batch, eager),
              compiled.mtp_forward(hidden, batch.input_ids, batch))
        seed += 1
    assert compiled.recompiles == 0 and compiled.compiles == 4
    assert compiled.replays == 3 + 3 + 3


@pytest.mark.timeout(1200)
def test_a_step_needing_a_new_graph_after_warm_up_counts_as_a_recompile(torch_model):
    """The counter the tests above rely on does see a recompile: a verify step after a
    warm-up of decode steps only."""
    cache = torch_model.allocate_cache(16, PAGE, 5, spec_tokens=SPEC)
    graphs = StepGraphs(torch_model, cache, max_num_seqs=1, compile=True)
    graphs.warm_up([StepKind.DECODE])
    assert (graphs.compiles, graphs.recompiles) == (1, 0)
    lens = warm(torch_model, cache, [0])
    graphs.forward_batch(batch_of([3], lens, [0], TABLES[:1], verify=True))
    assert (graphs.compiles, graphs.recompiles) == (2, 1)


@pytest.mark.timeout(1800)
def test_engine_compiles_at_start_and_gives_the_eager_greedy_tokens(torch_model):
    """EngineConfig.compile: every bucket of every kind compiled when the Engine is built
    (one bucket here, step_buckets=[4]: three sequences run in it with a padded row); greedy
    output with MTP (k=2) equal to the eager engine's, with no recompile."""
    eager, _ = greedy_run(torch_model, False, SPEC)
    out, engine = greedy_run(torch_model, False, SPEC, compile=True, step_buckets=[4])
    graphs = engine.runner.step_graphs
    assert graphs.compile and graphs.warm and graphs.compiles == 4
    assert graphs.replays > 0 and graphs.recompiles == 0
    assert out == eager and all(len(t) == 12 for t in out.values())


def test_compiled_steps_are_cached_under_the_users_cache_dir(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from baton.workers.model.graphs import compile_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for before in (None, default_cache_dir()):  # unset, or inductor's own default
        if before is None:
            monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", before)
        assert compile_cache_dir() == tmp_path / "baton" / "inductor"
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "baton" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache_dir() == tmp_path / "mine"
