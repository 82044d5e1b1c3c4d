"""Expert parallelism over 2 and 4 gloo processes equals the single-rank MoE, and all ranks
agree bit for bit.

The ranks are forked from the test process (torch is imported once; a fresh interpreter per
rank would spend most of the test importing it), run with one intra-op thread, and exit
through multiprocessing's os._exit.
"""

from __future__ import annotations

import io
import multiprocessing
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
from torch import nn

from baton.kernels import QuantExperts, route, set_backend
from baton.kernels.ep import EPGroup, EPQuantExperts, shard_experts

EXPERTS, WIDTH, INTERMEDIATE = 8, 32, 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_format(fmt: str, backend: str, tokens: int, top_k: int, experts: int) -> dict:
    """Single-rank result and expert-parallel result of the same seeded layer and batch."""
    gen = torch.Generator().manual_seed(0)
    up = torch.randn(experts, INTERMEDIATE, WIDTH, generator=gen) / WIDTH ** 0.5
    down = torch.randn(experts, WIDTH, INTERMEDIATE, generator=gen) / INTERMEDIATE ** 0.5
    x = torch.randn(tokens, WIDTH, generator=gen).bfloat16()
    weights, ids = route(torch.randn(tokens, experts, generator=gen), None, top_k)
    ids[: tokens // 2, 0] = 0  # a crowded expert
    single = QuantExperts.from_float(up, down, fmt, torch.bfloat16)
    set_backend(single, backend)
    reference = single(x, ids, weights)

    model = nn.Sequential(nn.Identity(), nn.ModuleList([single]))
    shard_experts(model, EPGroup())
    sharded = model[1][0]
    assert isinstance(sharded, EPQuantExperts) and sharded.backend == backend
    first, last = sharded.expert_range
    assert sharded.up_weight.shape[0] == last - first
    return {"reference": reference, "result": sharded(x, ids, weights), "range": (first, last)}


def rank_main(rank, world, port, fmts, backend, tokens, top_k, experts, queue):
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        try:
            results = {fmt: one_format(fmt, backend, tokens, top_k, experts) for fmt in fmts}
            # As bytes: tensors put on a queue would travel as shared memory that dies
            # with this process.
            buffer = io.BytesIO()
            torch.save(results, buffer)
            queue.put((rank, buffer.getvalue()))
        finally:
            dist.destroy_process_group()
    except BaseException:
        queue.put((rank, traceback.format_exc()))


def run_ranks(world, tokens, top_k, fmts, backend, experts=EXPERTS):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=rank_main,
                         args=(r, world, port, fmts, backend, tokens, top_k, experts, queue))
             for r in range(world)]
    for proc in procs:
        proc.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
    for rank, result in results.items():
        assert isinstance(result, bytes), f"rank {rank} failed:\n{result}"
    return [torch.load(io.BytesIO(results[r])) for r in range(world)]


@pytest.mark.parametrize("world,tokens", [(2, 7), (4, 3)])
def test_expert_parallel_equals_single_rank_bit_for_bit(world, tokens):
    # 4 ranks, 3 tokens: one rank has no tokens of its own and still serves its experts.
    ranks = run_ranks(world, tokens, top_k=3, fmts=("nvfp4", "bf16"), backend="torch")
    for fmt in ("nvfp4", "bf16"):
        runs = [r[fmt] for r in ranks]
        assert [r["range"] for r in runs] == [(EXPERTS * i // world, EXPERTS * (i + 1) // world)
                                              for i in range(world)]
        for r in runs:
            assert torch.equal(r["reference"], runs[0]["reference"])
            assert torch.equal(r["result"].view(torch.int16), runs[0]["result"].view(torch.int16))
        assert torch.equal(runs[0]["result"].view(torch.int16),
                           runs[0]["reference"].view(torch.int16))


def test_expert_parallel_with_triton_experts():
    ranks = run_ranks(2, tokens=5, top_k=2, fmts=("nvfp4",), backend="triton", experts=4)
    assert torch.equal(ranks[0]["nvfp4"]["result"], ranks[1]["nvfp4"]["result"])
    ref = ranks[0]["nvfp4"]["reference"].float()
    torch.testing.assert_close(ranks[0]["nvfp4"]["result"].float(), ref, rtol=1.6e-2,
                               atol=1.6e-2 * ref.abs().max())


def meta_shard(rank, world, port, queue):
    """What the model loader does: shard a meta-device model, then materialize it."""
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        try:
            with torch.device("meta"):
                model = nn.ModuleDict({"moe": QuantExperts(6, 32, 16, "nvfp4")})
            names = set(model.state_dict())
            shard_experts(model, dist.group.WORLD)
            model.to_empty(device="cpu")
            sharded = model["moe"]
            queue.put((rank, (names == set(model.state_dict()), sharded.expert_range,
                              tuple(sharded.up_weight.shape),
                              tuple(sharded.down_weight_scale_2.shape))))
        finally:
            dist.destroy_process_group()
    except BaseException:
        queue.put((rank, traceback.format_exc()))


def test_shard_a_meta_model_keeps_names_and_splits_unevenly():
    ctx = multiprocessing.get_context("fork")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=meta_shard, args=(r, 4, port, queue)) for r in range(4)]
    for proc in procs:
        proc.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
    # 6 experts over 4 ranks: [0, 1), [1, 3), [3, 4), [4, 6).
    expected = {0: (0, 1), 1: (1, 3), 2: (3, 4), 3: (4, 6)}
    for rank, result in results.items():
        assert not isinstance(result, str), f"rank {rank} failed:\n{result}"
        same_names, expert_range, up_shape, scale2_shape = result
        first, last = expected[rank]
        assert same_names and expert_range == (first, last)
        assert up_shape == (last - first, 16, 16) and scale2_shape == (last - first,)


def test_ep_group_arithmetic_and_errors():
    with pytest.raises(ValueError, match="init_process_group"):
        EPGroup()
    group = EPGroup.__new__(EPGroup)  # the arithmetic needs no process group
    group.group, group.rank, group.size = None, 1, 4
    assert [group.expert_range(6, r) for r in range(4)] == [(0, 1), (1, 3), (3, 4), (4, 6)]
    assert group.expert_range(8) == (2, 4)
    assert group.owners(torch.arange(6), 6).tolist() == [0, 1, 1, 2, 3, 3]
    assert [group.token_range(3, r) for r in range(4)] == [(0, 0), (0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match="num_experts=3"):
        group.expert_range(3)
