"""Mamba2 and paged-attention kernels of the decode and prefill hot path against the HBM
roofline and the model's current torch path (GPU).

    python benchmarks/kernels/bench_hot_path.py [--what decode,verify,prefill]
        [--batch 1,16,64] [--context 512,4096] [--tokens 4096] [--out FILE]
    python benchmarks/kernels/bench_hot_path.py --smoke --out smoke.md   # tiny shapes, CPU

Shapes: one layer of Nemotron 3 Nano (Mamba2: 64 heads of 64, 8 groups, state 128,
conv_dim 6144, 4 taps, chunk 128, fp32 SSM state; attention: 32 query / 2 KV heads of 128,
pages of 16 tokens), bf16 activations.

Method. The run first measures its own ceilings (bench_moe's: HBM read bandwidth from a bf16
sum over 2 GiB, bf16 GEMM rate from a square matmul). Each case is checked against the
kernel's torch reference (baton.kernels *_ref) on fresh random data before it is timed, and
a failed check fails the run. Timing uses CUDA events around CUDA-graph replays of a rotation
of calls over distinct state slots / KV pages (more than 200 MB between two uses of the same
bytes where a call is big enough, so the 50 MB L2 does not serve them), and the same calls
launched one by one beside.

Formulas (bytes a call must move at least; s = bytes of the state dtype):
  ssm decode      B * (2 * h*p*n*s + (h*p + h + 2*g*n) * 2 + h*p*4)      state read + written
  ssm verify      B * ((1 + (1+K)) * h*p*n*s + (1+K) * (...inputs, y))   read once, 1+K snapshots
  conv decode     B * (2 * W*(k-1)*2 + 2 * W*2) + W*k*2
  attn decode     sum over sequences of ctx * KV*D*2*2 (K and V) + q and out
  scan prefill    T * (W*2 + h*2 + h*p*4) + 4 * NC*h*p*n*4 (chunk states written, read, written,
                  read) + 2 * h*p*n*s;  flops T * h * (4*p*n + L*(n + p))  (causal halves)
  conv prefill    T * W * 2 * 2
  attn prefill    flops 4 * Q * D * sum n * (cached + (n + 1) / 2);  bytes: K/V read once
  roofline        max(bytes / HBM read, flops / bf16 GEMM rate)
  vs torch        the model's torch path (workers/model: gather, ssm_step / ssd_chunk_scan /
                  conv1d / SDPA, scatter), launched one by one, / our graph time
The table goes to stdout and to benchmarks/results/<date>-<device>-hot-path.md.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # the CPU smoke run needs the interpreter, set before import
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe import Clock, markdown_report, measure_ceilings, relative_error, write_report

from baton.kernels import (
    MambaChunks,
    causal_conv1d,
    causal_conv1d_update,
    mamba_chunk_scan,
    paged_attention,
    prefill_attention,
    ssm_state_update,
)
from baton.kernels.attention_decode import paged_attention_ref
from baton.kernels.attention_prefill import prefill_attention_ref
from baton.kernels.mamba_conv import causal_conv1d_ref
from baton.kernels.mamba_conv_step import causal_conv1d_update_ref
from baton.kernels.mamba_step import ssm_state_update_ref
from baton.kernels.ssd_combined import mamba_chunk_scan_ref
from baton.workers.model.mamba import ssd_chunk_scan, ssm_step

ROTATION_BYTES = 220e6  # more than 4x the H100's 50 MB L2
TOLERANCE = 2e-2  # bf16 activations


@dataclass(frozen=True)
class Shapes:
    name: str
    heads: int
    head_dim: int
    groups: int
    dstate: int
    conv_kernel: int
    chunk: int
    q_heads: int
    kv_heads: int
    attn_dim: int
    page_size: int

    @property
    def conv_dim(self) -> int:
        return self.heads * self.head_dim + 2 * self.groups * self.dstate


NANO = Shapes("nano", 64, 64, 8, 128, 4, 128, 32, 2, 128, 16)
SMOKE = Shapes("smoke", 4, 8, 2, 8, 4, 8, 4, 2, 16, 4)
SPEC = 3  # MTP draft tokens


@dataclass
class Row:
    case: str
    size: str
    graph_s: float
    launch_s: float
    bytes: float
    flops: float
    torch_s: float
    error: float

    def cells(self, hbm: float, peak: float) -> list[str]:
        roofline = max(self.bytes / hbm, self.flops / peak)
        gbps = self.bytes / self.graph_s / 1e9
        return [self.case, self.size, f"{self.graph_s * 1e6:.1f}",
                f"{self.launch_s * 1e6:.1f}", f"{self.bytes / 1e6:.2f}", f"{gbps:.0f}",
                f"{100 * gbps * 1e9 / hbm:.0f}%", f"{self.flops / self.graph_s / 1e12:.2f}",
                f"{roofline * 1e6:.1f}", f"{self.graph_s / roofline:.2f}x",
                f"{self.torch_s / self.graph_s:.1f}x", f"{self.error:.1e}"]


HEADER = ["case", "size", "time us (graph)", "time us (launches)", "MB moved", "GB/s",
          "% HBM", "TFLOP/s", "roofline us", "time / roofline", "vs torch", "rel err"]


class Bench:
    """Builds each case's inputs (rotated over distinct slots / pages), checks, times."""

    def __init__(self, shapes: Shapes, device: torch.device, clock: Clock, smoke: bool,
                 failures: list[str]):
        self.s, self.device, self.clock, self.smoke = shapes, device, clock, smoke
        self.failures = failures
        self.gen = torch.Generator(device=device).manual_seed(0)
        s = shapes
        self.A = -torch.rand(s.heads, device=device, generator=self.gen) - 0.5
        self.D = self.randn(s.heads)
        self.dt_bias = self.randn(s.heads) * 0.5
        self.conv_weight = self.randn(s.conv_dim, s.conv_kernel) * 0.5
        self.conv_bias = self.randn(s.conv_dim)

    def randn(self, *shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device=self.device, generator=self.gen).to(dtype)

    def rotations(self, call_bytes: float) -> int:
        if self.smoke:
            return 1
        return max(2, min(64, math.ceil(ROTATION_BYTES / max(call_bytes, 1.0))))

    def check(self, name: str, got, want) -> float:
        got, want = (got if isinstance(got, tuple) else (got,)), \
            (want if isinstance(want, tuple) else (want,))
        error = max(relative_error(g.float(), w.float()) for g, w in zip(got, want))
        if not error < TOLERANCE:
            self.failures.append(f"{name}: relative error {error:.2e}")
        return error

    def mamba_inputs(self, tokens: int) -> dict:
        s = self.s
        xbc = self.randn(tokens, s.conv_dim) * 0.5
        x, b, c = xbc.split([s.heads * s.head_dim, s.groups * s.dstate, s.groups * s.dstate], -1)
        return dict(xbc=xbc, x=x.view(tokens, s.heads, s.head_dim),
                    B=b.view(tokens, s.groups, s.dstate), C=c.view(tokens, s.groups, s.dstate),
                    dt=self.randn(tokens, s.heads) - 1.0)

    def timed(self, name: str, size: str, calls, torch_calls, bytes_: float, flops: float,
              error: float) -> Row:
        graph_s = self.clock.time(calls, graph=True)
        launch_s = self.clock.time(calls, graph=False)
        torch_s = self.clock.time(torch_calls, graph=False)
        return Row(name, size, graph_s, launch_s, bytes_, flops, torch_s, error)

    # ------------------------------------------------------------------ decode / verify
    def ssm_decode(self, batch: int, verify: bool) -> Row:
        s = self.s
        tokens = batch * (1 + SPEC) if verify else batch
        state_bytes = s.heads * s.head_dim * s.dstate * 4
        io_bytes = tokens * ((s.heads * s.head_dim + s.heads + 2 * s.groups * s.dstate) * 2
                             + s.heads * s.head_dim * 4)
        call_bytes = batch * state_bytes * ((2 + SPEC) if verify else 2) + io_bytes
        rot = self.rotations(call_bytes)
        states = self.randn(rot * batch, s.heads, s.head_dim, s.dstate, dtype=torch.float32)
        snapshots = (torch.zeros(rot * batch, 1 + SPEC, s.heads, s.head_dim, s.dstate,
                                 device=self.device) if verify else None)
        inp = self.mamba_inputs(tokens)
        cu = (torch.arange(0, tokens + 1, 1 + SPEC, dtype=torch.int32, device=self.device)
              if verify else None)
        out = torch.empty(tokens, s.heads, s.head_dim, device=self.device)
        kw = dict(D=self.D, dt_bias=self.dt_bias, cu_seqlens=cu,
                  max_tokens=1 + SPEC if verify else 1)
        slots = [torch.arange(r * batch, (r + 1) * batch, device=self.device) for r in range(rot)]
        args = (inp["x"], inp["dt"], self.A, inp["B"], inp["C"])
        got_states, want_states = states.clone(), states.clone()
        got_snaps = snapshots.clone() if verify else None
        want_snaps = snapshots.clone() if verify else None
        got = ssm_state_update(got_states, *args, slots[0], snapshots=got_snaps, **kw)
        want = ssm_state_update_ref(want_states, *args, slots[0], snapshots=want_snaps, **kw)
        name = "ssm verify 1+3" if verify else "ssm decode"
        error = self.check(name, (got, got_snaps if verify else got_states),
                           (want, want_snaps if verify else want_states))
        calls = [functools.partial(ssm_state_update, states, *args, slots[r],
                                   snapshots=snapshots, out=out, **kw) for r in range(rot)]
        if verify:
            torch_calls = [functools.partial(self._torch_ssm_verify, states, snapshots, inp,
                                             slots[r]) for r in range(min(2, rot))]
        else:
            torch_calls = [functools.partial(self._torch_ssm_decode, states, inp, slots[r])
                           for r in range(min(2, rot))]
        return self.timed(name, f"B={batch}", calls, torch_calls, call_bytes, 0.0, error)

    def _torch_ssm_decode(self, states, inp, slots):
        """The model's _decode after the conv: gather, ssm_step, D skip, scatter."""
        step = F.softplus(inp["dt"].float() + self.dt_bias.float())
        y, new = ssm_step(states[slots], inp["x"], step, self.A, inp["B"], inp["C"])
        states[slots] = new
        return y + self.D.float()[:, None] * inp["x"].float()

    def _torch_ssm_verify(self, states, snapshots, inp, slots):
        """The model's _verify: 1 + K steps from the gathered state, each kept."""
        n = len(slots)
        step = F.softplus(inp["dt"].float() + self.dt_bias.float()).view(n, 1 + SPEC, -1)
        x = inp["x"].view(n, 1 + SPEC, *inp["x"].shape[1:])
        b = inp["B"].view(n, 1 + SPEC, *inp["B"].shape[1:])
        c = inp["C"].view(n, 1 + SPEC, *inp["C"].shape[1:])
        state = states[slots]
        for j in range(1 + SPEC):
            _, state = ssm_step(state, x[:, j], step[:, j], self.A, b[:, j], c[:, j])
            snapshots[slots, j] = state

    def conv_decode(self, batch: int) -> Row:
        s = self.s
        w, taps = s.conv_dim, s.conv_kernel - 1
        call_bytes = batch * (2 * w * taps * 2 + 2 * w * 2) + w * s.conv_kernel * 2
        rot = self.rotations(call_bytes)
        states = self.randn(rot * batch, w, taps)
        x = self.randn(batch, w)
        slots = [torch.arange(r * batch, (r + 1) * batch, device=self.device) for r in range(rot)]
        got_states, want_states = states.clone(), states.clone()
        got = causal_conv1d_update(x, got_states, self.conv_weight, self.conv_bias, slots[0])
        want = causal_conv1d_update_ref(x, want_states, self.conv_weight, self.conv_bias,
                                        slots[0])
        error = self.check("conv decode", (got, got_states), (want, want_states))
        out = torch.empty_like(x)
        calls = [functools.partial(causal_conv1d_update, x, states, self.conv_weight,
                                   self.conv_bias, slots[r], out=out) for r in range(rot)]
        torch_calls = [functools.partial(self._torch_conv_decode, states, x, slots[r])
                       for r in range(min(2, rot))]
        return self.timed("conv decode", f"B={batch}", calls, torch_calls, call_bytes, 0.0,
                          error)

    def _torch_conv_decode(self, states, x, slots):
        window = torch.cat([states[slots], x[..., None]], dim=-1)
        out = F.silu(F.conv1d(window, self.conv_weight[:, None], self.conv_bias,
                              groups=window.shape[1]))
        states[slots] = window[..., 1:]
        return out

    def kv_cache(self, seqs: int, context: int):
        s = self.s
        pages_per_seq = -(-context // s.page_size)
        k = self.randn(seqs * pages_per_seq, s.page_size, s.kv_heads, s.attn_dim)
        v = self.randn(*k.shape)
        order = torch.randperm(seqs * pages_per_seq, device=self.device, generator=self.gen)
        tables = order.view(seqs, pages_per_seq).to(torch.int32)
        return k, v, tables

    def attention_decode(self, batch: int, context: int, verify: bool) -> Row:
        s = self.s
        queries = 1 + SPEC if verify else 1
        kv_bytes = context * s.kv_heads * s.attn_dim * 2 * 2
        call_bytes = batch * (kv_bytes + queries * s.q_heads * s.attn_dim * 2 * 2)
        rot = self.rotations(call_bytes)
        k, v, tables = self.kv_cache(rot * batch, context)
        q = self.randn(batch * queries, s.q_heads, s.attn_dim)
        lens = torch.full((batch,), context, dtype=torch.int32, device=self.device)
        cu = (torch.arange(0, batch * queries + 1, queries, dtype=torch.int32,
                           device=self.device) if verify else None)
        kw = dict(cu_seqlens=cu, max_queries=queries)
        table = [tables[r * batch:(r + 1) * batch] for r in range(rot)]
        error = self.check("attention", paged_attention(q, k, v, table[0], lens, **kw),
                           paged_attention_ref(q, k, v, table[0], lens, **kw))
        out = torch.empty_like(q)
        calls = [functools.partial(paged_attention, q, k, v, table[r], lens, out=out, **kw)
                 for r in range(rot)]
        torch_calls = [functools.partial(self._torch_attention, q, k, v, table[r], context,
                                         queries) for r in range(min(2, rot))]
        name = "attention verify 1+3" if verify else "attention decode"
        return self.timed(name, f"B={batch} ctx={context}", calls, torch_calls, call_bytes,
                          4 * batch * queries * context * s.q_heads * s.attn_dim, error)

    def _torch_attention(self, q, k_pages, v_pages, table, context, queries):
        """layers.py's path: gather every sequence's pages into a padded copy, SDPA."""
        n = table.shape[0]
        keys = k_pages[table.long()].flatten(1, 2)[:, :context].transpose(1, 2)
        values = v_pages[table.long()].flatten(1, 2)[:, :context].transpose(1, 2)
        rows = q.view(n, queries, *q.shape[1:]).transpose(1, 2)  # [S, Q, n, D]
        positions = context - queries + torch.arange(queries, device=q.device)
        mask = torch.arange(context, device=q.device)[None, :] <= positions[:, None]
        return F.scaled_dot_product_attention(rows, keys, values, attn_mask=mask,
                                              enable_gqa=True)

    # ------------------------------------------------------------------ prefill
    def scan_prefill(self, tokens: int) -> Row:
        s = self.s
        inp = self.mamba_inputs(tokens)
        chunks = MambaChunks.build([tokens], s.chunk, self.device)
        nc = chunks.num_chunks
        state = s.heads * s.head_dim * s.dstate * 4
        call_bytes = (tokens * (s.conv_dim * 2 + s.heads * 2 + s.heads * s.head_dim * 4)
                      + 4 * nc * state + 2 * state)
        flops = tokens * s.heads * (4 * s.head_dim * s.dstate
                                    + s.chunk * (s.dstate + s.head_dim))
        rot = self.rotations(call_bytes)
        states = self.randn(rot, s.heads, s.head_dim, s.dstate, dtype=torch.float32)
        args = (inp["x"], inp["dt"], self.A, inp["B"], inp["C"], chunks)
        kw = dict(D=self.D, dt_bias=self.dt_bias)
        slot = [torch.tensor([r], device=self.device) for r in range(rot)]
        got_states, want_states = states.clone(), states.clone()
        error = self.check("scan prefill",
                           (mamba_chunk_scan(*args, got_states, slot[0], **kw), got_states),
                           (mamba_chunk_scan_ref(*args, want_states, slot[0], **kw),
                            want_states))
        calls = [functools.partial(mamba_chunk_scan, *args, states, slot[r], **kw)
                 for r in range(rot)]
        torch_calls = [functools.partial(self._torch_scan, inp, states, 0)]
        return self.timed("scan prefill", f"T={tokens}", calls, torch_calls, call_bytes, flops,
                          error)

    def _torch_scan(self, inp, states, slot):
        step = F.softplus(inp["dt"].float() + self.dt_bias.float())
        y, final = ssd_chunk_scan(inp["x"][None], step[None], self.A, inp["B"][None],
                                  inp["C"][None], self.s.chunk, states[slot:slot + 1])
        states[slot] = final[0]
        return y + self.D.float()[:, None] * inp["x"].float()

    def conv_prefill(self, tokens: int) -> Row:
        s = self.s
        w, taps = s.conv_dim, s.conv_kernel - 1
        call_bytes = tokens * w * 2 * 2
        rot = self.rotations(call_bytes)
        xs = [self.randn(tokens, w) for _ in range(rot)]
        states = self.randn(rot, w, taps)
        chunks = MambaChunks.build([tokens], s.chunk, self.device)
        slot = [torch.tensor([r], device=self.device) for r in range(rot)]
        got_states, want_states = states.clone(), states.clone()
        error = self.check(
            "conv prefill",
            (causal_conv1d(xs[0], self.conv_weight, self.conv_bias, chunks, got_states,
                           slot[0]), got_states),
            (causal_conv1d_ref(xs[0], self.conv_weight, self.conv_bias, chunks, want_states,
                               slot[0]), want_states))
        calls = [functools.partial(causal_conv1d, xs[r], self.conv_weight, self.conv_bias,
                                   chunks, states, slot[r]) for r in range(rot)]
        torch_calls = [functools.partial(self._torch_conv_prefill, xs[r], states, r)
                       for r in range(min(2, rot))]
        return self.timed("conv prefill", f"T={tokens}", calls, torch_calls, call_bytes, 0.0,
                          error)

    def _torch_conv_prefill(self, x, states, slot):
        window = torch.cat([states[slot], x.T], dim=-1)[None]
        out = F.silu(F.conv1d(window, self.conv_weight[:, None], self.conv_bias,
                              groups=window.shape[1]))
        states[slot] = window[0, :, -(self.s.conv_kernel - 1):]
        return out

    def attention_prefill(self, tokens: int, cached: int) -> Row:
        s = self.s
        context = cached + tokens
        k, v, tables = self.kv_cache(1, context)
        q = self.randn(tokens, s.q_heads, s.attn_dim)
        lens = torch.tensor([context], dtype=torch.int32, device=self.device)
        cu = torch.tensor([0, tokens], dtype=torch.int32, device=self.device)
        # Checked on the chunk's last (at most) 512 queries: the reference's fp32 scores of a
        # whole 4k chunk would not fit beside the rest.
        tail = min(tokens, 512)
        tail_q = q[-tail:]
        tail_cu = torch.tensor([0, tail], dtype=torch.int32, device=self.device)
        error = self.check("attention prefill",
                           prefill_attention(tail_q, k, v, tables, lens, tail_cu, tail),
                           prefill_attention_ref(tail_q, k, v, tables, lens, tail_cu, tail))
        flops = 4 * s.q_heads * s.attn_dim * tokens * (cached + (tokens + 1) / 2)
        call_bytes = (context * s.kv_heads * s.attn_dim * 2 * 2
                      + tokens * s.q_heads * s.attn_dim * 4)
        calls = [functools.partial(prefill_attention, q, k, v, tables, lens, cu, tokens)]
        torch_calls = [functools.partial(self._torch_attention, q, k, v, tables, context,
                                         tokens)]
        return self.timed("attention prefill", f"T={tokens} cached={cached}", calls,
                          torch_calls, call_bytes, flops, error)


def markdown(rows: list[Row], hbm: float, peak: float, device_name: str) -> str:
    return markdown_report(f"Mamba2 and paged-attention kernels on {device_name}",
                           "bench_hot_path.py", hbm, peak, "the kernel's torch reference",
                           HEADER, [row.cells(hbm, peak) for row in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", default="decode,verify,prefill")
    parser.add_argument("--batch", default=None, help="decode batch sizes (default 1,16,64)")
    parser.add_argument("--context", default=None,
                        help="decode context lengths (default 512,4096)")
    parser.add_argument("--tokens", type=int, default=None, help="prefill tokens (default 4096)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU (Triton interpreter): checks the script")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("needs a CUDA device (or --smoke)")
    what = set(args.what.split(","))
    unknown = what - {"decode", "verify", "prefill"}
    if unknown:
        parser.error(f"--what: {sorted(unknown)} not among decode, verify, prefill")
    device = torch.device("cpu" if args.smoke else "cuda")
    batches = [int(b) for b in (args.batch or ("3" if args.smoke else "1,16,64")).split(",")]
    contexts = [int(c) for c in (args.context or ("21" if args.smoke else "512,4096")).split(",")]
    tokens = args.tokens or (19 if args.smoke else 4096)
    clock = Clock(device, 1 if args.smoke else args.reps)
    hbm, peak = measure_ceilings(device, clock, args.smoke)
    device_name = "cpu" if args.smoke else torch.cuda.get_device_name(device)
    failures: list[str] = []
    bench = Bench(SMOKE if args.smoke else NANO, device, clock, args.smoke, failures)

    rows: list[Row] = []

    def run(make, *a):
        rows.append(make(*a))
        print(" | ".join(rows[-1].cells(hbm, peak)), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for batch in batches:
        if "decode" in what:
            run(bench.ssm_decode, batch, False)
            run(bench.conv_decode, batch)
            for context in contexts:
                run(bench.attention_decode, batch, context, False)
        if "verify" in what:
            run(bench.ssm_decode, batch, True)
            run(bench.attention_decode, batch, contexts[-1], True)
    if "prefill" in what:
        run(bench.scan_prefill, tokens)
        run(bench.conv_prefill, tokens)
        run(bench.attention_prefill, tokens, 0)
        run(bench.attention_prefill, max(1, tokens // 4), tokens - max(1, tokens // 4))

    return write_report(markdown(rows, hbm, peak, device_name), failures, device_name,
                        "hot-path", args.out)

if __name__ == "__main__":
    sys.exit(main())
