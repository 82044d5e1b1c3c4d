"""Cache-aware forward: chunked prefill + decode of several sequences joining at different
steps, state handed to a second cache, MTP with its own KV, speculative verify + accept; all
against the full forward (no cache) in fp32."""

from __future__ import annotations

import random

import pytest
import torch

from baton.workers.model import ForwardBatch


class Driver:
    """Feeds sequences to model.forward_batch the way an engine would: pages from a shuffled
    pool, one slot per sequence, teacher-forced tokens; keeps every returned hidden row."""

    def __init__(self, model, cache, seed=0):
        self.model, self.cache = model, cache
        rng = random.Random(seed)
        self.free_pages = list(range(cache.num_pages))
        rng.shuffle(self.free_pages)
        self.free_slots = list(range(cache.num_slots))
        rng.shuffle(self.free_slots)
        self.tables, self.slots, self.cached = {}, {}, {}
        self.hidden = {}

    def add(self, seq, cached=0, table=None, slot=None):
        self.tables[seq] = [] if table is None else list(table)
        self.slots[seq] = self.free_slots.pop() if slot is None else slot
        self.cached[seq] = cached
        self.hidden[seq] = []

    def batch(self, work, tokens, spec_verify=False):
        """work: [(seq, n)]: the next n tokens of each sequence."""
        ids, positions, tables = [], [], []
        for seq, n in work:
            start = self.cached[seq]
            ids += tokens[seq][start:start + n]
            positions += range(start, start + n)
            need = -(-(start + n) // self.cache.page_size)
            while len(self.tables[seq]) < need:
                self.tables[seq].append(self.free_pages.pop())
        width = max(len(self.tables[s]) for s, _ in work) + 1
        tables = [self.tables[s] + [-1] * (width - len(self.tables[s])) for s, _ in work]
        return ForwardBatch(
            input_ids=torch.tensor(ids), positions=torch.tensor(positions),
            seq_lens=[n for _, n in work], cached_lens=[self.cached[s] for s, _ in work],
            block_tables=torch.tensor(tables, dtype=torch.int32),
            state_slots=torch.tensor([self.slots[s] for s, _ in work]), spec_verify=spec_verify)

    def step(self, work, tokens, spec_verify=False, advance=True, on_layer_done=None):
        batch = self.batch(work, tokens, spec_verify)
        hidden = self.model.forward_batch(batch, self.cache, on_layer_done=on_layer_done)
        rows = iter(hidden.split([n for _, n in work]))
        for seq, n in work:
            chunk = next(rows)
            if advance:
                self.hidden[seq].append(chunk)
                self.cached[seq] += n
        return batch, hidden


def random_tokens(lengths, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def full_logits(model, seq_tokens):
    return model(torch.tensor([seq_tokens]))[0]


def test_mixed_steps_match_full_forward(tiny_model, logits_close):
    model = tiny_model
    tokens = random_tokens([19, 8, 25, 3], model.config.vocab_size, seed=1)
    cache = model.allocate_cache(num_pages=40, page_size=4, num_slots=6)
    driver = Driver(model, cache)
    for seq in range(4):
        driver.add(seq)
    done_layers = []
    schedule = [
        [(0, 7), (1, 6)],  # two prompt chunks
        [(0, 5), (1, 1), (2, 9)],  # chunk continues, decode, a new sequence joins
        [(2, 1), (0, 1), (1, 1)],  # prompt chunk of one token while others decode
        [(0, 6), (2, 10), (3, 3)],  # chunks that cross chunk_size and page boundaries
    ]
    for work in schedule:
        driver.step(work, tokens)
    driver.step([(2, 5)], tokens, on_layer_done=done_layers.append)
    assert done_layers == list(range(model.num_layers))
    while any(driver.cached[s] < len(tokens[s]) for s in range(4)):
        work = [(s, 1) for s in range(4) if driver.cached[s] < len(tokens[s])]
        driver.step(work, tokens)
    for seq in range(4):
        got = model.compute_logits(torch.cat(driver.hidden[seq]))
        logits_close(got, full_logits(model, tokens[seq]))


def test_state_handoff_to_a_second_cache(tiny_model, logits_close):
    model = tiny_model
    tokens = random_tokens([17], model.config.vocab_size, seed=2)
    prompt = 13
    source = model.allocate_cache(num_pages=12, page_size=4, num_slots=2)
    sender = Driver(model, source, seed=1)
    sender.add(0)
    sender.step([(0, 8)], tokens)
    sender.step([(0, 5)], tokens)

    target = model.allocate_cache(num_pages=9, page_size=8, num_slots=3)
    receiver = Driver(model, target, seed=2)
    receiver.add(0, cached=prompt, table=[7, 2, 5], slot=2)
    row_out = torch.tensor(sender.tables[0], dtype=torch.int32)
    row_in = torch.tensor(receiver.tables[0], dtype=torch.int32)
    for layer, kind in enumerate(model.layer_kinds[: model.num_layers]):
        if kind == "attention":
            kv = source.read_state(layer, "kv", row_out, None, 0, prompt)
            assert kv.shape == (2, prompt, 2, 8)
            # Two transfer chunks, as a streaming sender would send them.
            target.write_state(layer, "kv", row_in, None, 0, kv[:, :6])
            target.write_state(layer, "kv", row_in, None, 6, kv[:, 6:])
        elif kind == "mamba":
            for what in ("conv", "ssm"):
                state = source.read_state(layer, what, None, sender.slots[0])
                target.write_state(layer, what, None, 2, 0, state)
    while receiver.cached[0] < len(tokens[0]):
        receiver.step([(0, 1)], tokens)
    got = model.compute_logits(torch.cat(receiver.hidden[0]))
    logits_close(got, full_logits(model, tokens[0])[prompt:])


def test_mtp_with_cache_matches_full(tiny_model):
    model = tiny_model
    assert model.num_mtp_layers == 2
    assert model.layer_kinds[model.num_layers:] == ["attention", "moe"]
    tokens = random_tokens([15], model.config.vocab_size, seed=3)[0]
    ids = torch.tensor([tokens])
    with torch.inference_mode():
        hidden = model.hidden_states(ids)[0]  # [15, H]
    expected = model.mtp_forward_full(hidden[None, :-1], ids[:, 1:])[0]  # positions 0..13
    cache = model.allocate_cache(num_pages=8, page_size=4, num_slots=1)
    driver = Driver(model, cache)
    driver.add(0)
    outputs = []
    for n in (6, 5, 1, 1, 1):
        start = driver.cached[0]
        batch, _ = driver.step([(0, n)], [tokens])
        outputs.append(model.mtp_forward(hidden[start:start + n], ids[0, start + 1:start + n + 1],
                                         batch, cache))
    got = torch.cat(outputs)
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-4
    mtp_layer = model.num_layers  # the MTP attention sublayer keeps its own KV
    kv = cache.read_state(mtp_layer, "mtp_kv", torch.tensor(driver.tables[0]), None, 0, 14)
    assert kv.abs().sum() > 0
    with pytest.raises(ValueError, match="kind"):
        cache.read_state(mtp_layer, "kv", torch.tensor(driver.tables[0]), None, 0, 14)


@pytest.mark.parametrize("accepted, verified", [((1, 3), (3, 3)), ((3, 2), (3, 3)),
                                                ((2, 1), (3, 2))])
def test_spec_verify_then_accept_equals_plain_feeding(tiny_model, logits_close, accepted,
                                                      verified):
    model = tiny_model
    spec = 2
    tokens = random_tokens([16, 12], model.config.vocab_size, seed=4)
    cache = model.allocate_cache(num_pages=20, page_size=4, num_slots=4, spec_tokens=spec)
    driver = Driver(model, cache)
    driver.add(0)
    driver.add(1)
    driver.step([(0, 9), (1, 5)], tokens)
    # Verify 1 + K tokens per sequence; the cache keeps the state after each of them.
    batch, hidden = driver.step([(0, verified[0]), (1, verified[1])], tokens, spec_verify=True,
                                advance=False)
    logits = model.compute_logits(hidden)
    first = verified[0]
    logits_close(logits[:first], full_logits(model, tokens[0][:9 + first])[9:])
    logits_close(logits[first:], full_logits(model, tokens[1][:5 + verified[1]])[5:])
    cache.accept(batch.state_slots, torch.tensor(accepted))
    for seq, n in enumerate(accepted):
        driver.cached[seq] += n
    with pytest.raises(ValueError, match="num_accepted"):
        cache.accept(batch.state_slots, torch.tensor(accepted))  # nothing pending any more
    with pytest.raises(ValueError, match="num_accepted"):
        cache.accept(batch.state_slots[:1], torch.tensor([0]))  # 1..1+K only
    # Continue normally: the accepted state carries on, rejected drafts left no trace.
    while any(driver.cached[s] < len(tokens[s]) for s in range(2)):
        work = [(s, 1) for s in range(2) if driver.cached[s] < len(tokens[s])]
        driver.step(work, tokens)
    for seq in range(2):
        got = model.compute_logits(torch.cat(driver.hidden[seq][1:]))
        start = [9, 5][seq] + accepted[seq]
        logits_close(got, full_logits(model, tokens[seq])[start:])


def test_fresh_sequence_in_spec_verify_and_decode_starts_from_zero(tiny_model, logits_close):
    model = tiny_model
    tokens = random_tokens([4, 1], model.config.vocab_size, seed=5)
    cache = model.allocate_cache(num_pages=8, page_size=4, num_slots=2, spec_tokens=3)
    driver = Driver(model, cache)
    driver.add(0)
    driver.add(1)
    # Dirty the slots first: a fresh sequence must not see what a previous owner left.
    driver.step([(0, 4), (1, 1)], tokens, advance=False)
    _, hidden = driver.step([(0, 4)], tokens, spec_verify=True, advance=False)
    logits_close(model.compute_logits(hidden), full_logits(model, tokens[0]))
    _, hidden = driver.step([(1, 1)], tokens, advance=False)
    logits_close(model.compute_logits(hidden), full_logits(model, tokens[1]))


def test_equal_chunks_of_several_sequences_run_as_one_group(tiny_model, logits_close):
    model = tiny_model
    tokens = random_tokens([12, 12, 12], model.config.vocab_size, seed=6)
    cache = model.allocate_cache(num_pages=16, page_size=4, num_slots=3)
    driver = Driver(model, cache)
    for seq in range(3):
        driver.add(seq)
    batch = driver.batch([(0, 5), (1, 5), (2, 3)], tokens)
    assert sorted(len(g.seqs) for g in model.plan(batch, cache).chunk_groups) == [1, 2]
    driver.step([(0, 5), (1, 5), (2, 3)], tokens)
    driver.step([(0, 6), (1, 6), (2, 6)], tokens)  # one group continuing from cached state
    driver.step([(0, 1), (1, 1), (2, 3)], tokens)
    for seq in range(3):
        got = model.compute_logits(torch.cat(driver.hidden[seq]))
        logits_close(got, full_logits(model, tokens[seq]))


@pytest.mark.parametrize("ssm_dtype", [torch.float32, torch.bfloat16])
def test_bf16_model_with_cache_tracks_the_full_forward(tiny_checkpoint, ssm_dtype):
    from baton.workers.model import load_model

    model = load_model(tiny_checkpoint, dtype=torch.bfloat16, kernels="torch")
    tokens = random_tokens([14, 9], model.config.vocab_size, seed=7)
    cache = model.allocate_cache(num_pages=12, page_size=4, num_slots=2, spec_tokens=2,
                                 ssm_dtype=ssm_dtype)
    driver = Driver(model, cache)
    driver.add(0)
    driver.add(1)
    driver.step([(0, 10), (1, 6)], tokens)
    batch, _ = driver.step([(0, 3), (1, 3)], tokens, spec_verify=True)
    cache.accept(batch.state_slots, torch.tensor([3, 3]))
    driver.step([(0, 1)], tokens)
    for seq in range(2):
        got = model.compute_logits(torch.cat(driver.hidden[seq]))
        expected = full_logits(model, tokens[seq])
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert float((got - expected).norm() / expected.norm()) < 5e-2
