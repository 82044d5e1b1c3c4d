"""load_model(..., ep_group=g): two gloo ranks each load half of every expert stack and
compute the same logits as one process holding all experts."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import torch

RANK_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from baton.workers.model import ForwardBatch, load_model

    path, port, rank, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    model = load_model(path, dtype=torch.float32, kernels="torch", ep_group=dist.group.WORLD)
    experts = model.get_submodule("backbone.layers.2.mixer.experts")
    ids = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(0))
    logits = model(ids)
    cache = model.allocate_cache(num_pages=8, page_size=4, num_slots=2)
    batch = ForwardBatch(ids[0], torch.arange(13), [13], [0],
                         torch.tensor([[0, 1, 2, 3]], dtype=torch.int32), torch.tensor([1]))
    hidden = model.forward_batch(batch, cache)
    torch.save({"range": experts.expert_range, "local": experts.up_weight.shape[0],
                "logits": logits, "hidden": hidden}, out)
    dist.destroy_process_group()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_expert_parallel_ranks_match_one_process(tiny_checkpoint, tiny_model, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(script), str(tiny_checkpoint), str(port),
                               str(rank), str(tmp_path / f"rank{rank}.pt")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for rank in range(2)]
    for proc in procs:
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output.decode()[-3000:]
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert [r["range"] for r in results] == [(0, 4), (4, 8)]
    assert [r["local"] for r in results] == [4, 4]
    ids = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(0))
    expected = tiny_model(ids)
    for r in results:
        assert torch.equal(r["logits"], results[0]["logits"])  # ranks agree bit for bit
        assert float((r["logits"] - expected).abs().max() / expected.abs().max()) < 1e-5
        assert torch.equal(r["hidden"], results[0]["hidden"])
