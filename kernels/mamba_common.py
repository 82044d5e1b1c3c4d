"""Pieces the Mamba2 kernels share: the varlen chunk table of a prefill (MambaChunks), the
time step (softplus of dt + dt_bias, clamped to time_step_limit) in Triton and in torch,
and the check of the slot-indexed state arguments.

Shapes: T packed tokens, S sequences, NC chunks, h heads, p head dim, g groups, n state size.

Conventions every Mamba kernel follows (so one BatchPlan serves them all):
- Sequences are packed along T in order; sequence s owns tokens cu_seqlens[s] ..
  cu_seqlens[s + 1] - 1 (cu_seqlens [S + 1] int32, cu_seqlens[0] = 0).
- slot_ids [S] (int32 or int64) names each sequence's state slot; -1 marks a row that does
  nothing (a padded row of a CUDA-graph bucket, or a sequence another path handles): its
  slot, its state and its output rows are left untouched.
- has_initial_state [S] bool: True continues from the slot's state, False starts from zeros
  (a fresh sequence, cached_len == 0); None means every sequence continues.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@dataclass(frozen=True)
class MambaChunks:
    """How a packed batch splits into scan chunks; built once per step on the host and shared
    by every Mamba layer of the step.

    Chunks start at each sequence's first new token (the model's scan pads every sequence to a
    multiple of chunk_size the same way), so no chunk holds two sequences; a sequence of
    length 0 has no chunk.
    """

    chunk_size: int
    cu_seqlens: torch.Tensor  # [S + 1] int32, token offsets of the sequences
    seq_chunks: torch.Tensor  # [S + 1] int32, sequence s owns chunks seq_chunks[s] .. [s+1]-1
    chunk_seq: torch.Tensor  # [NC] int32, the sequence of each chunk
    chunk_start: torch.Tensor  # [NC] int32, the chunk's first token (index into T)
    chunk_len: torch.Tensor  # [NC] int32, its tokens (1 .. chunk_size)
    max_seqlen: int  # longest sequence (host int, sizes grids)

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @property
    def num_chunks(self) -> int:
        return self.chunk_seq.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    @classmethod
    def build(cls, seq_lens: list[int], chunk_size: int,
              device: torch.device | str = "cpu") -> MambaChunks:
        """seq_lens: new tokens per sequence (host ints, >= 0, in packing order)."""
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ValueError(f"chunk_size: must be an integer >= 1, got {chunk_size!r}")
        lens = [int(n) for n in seq_lens]
        if not lens:
            raise ValueError("seq_lens: the batch holds no sequence")
        if any(n < 0 for n in lens):
            raise ValueError(f"seq_lens: must be >= 0, got {lens}")
        cu, seq_chunks = [0], [0]
        chunk_seq, chunk_start, chunk_len = [], [], []
        for s, n in enumerate(lens):
            for c0 in range(0, n, chunk_size):
                chunk_seq.append(s)
                chunk_start.append(cu[-1] + c0)
                chunk_len.append(min(chunk_size, n - c0))
            cu.append(cu[-1] + n)
            seq_chunks.append(len(chunk_seq))

        def ints(values):
            return torch.tensor(values, dtype=torch.int32, device=device)

        return cls(chunk_size, ints(cu), ints(seq_chunks), ints(chunk_seq), ints(chunk_start),
                   ints(chunk_len), max(lens))


# ---------------------------------------------------------------------- time step
@triton.jit
def time_step(dt_raw, dt_bias, dt_low, dt_high):
    """softplus(dt_raw + dt_bias) clamped to [dt_low, dt_high], fp32, as torch computes it:
    x above 20 passes through, below it log1p(exp(x)) (log1p by Goldberg's correction, so
    small results keep their relative precision)."""
    x = dt_raw + dt_bias
    u = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + u
    log1p = tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))
    soft = tl.where(x > 20.0, x, log1p)
    return tl.minimum(tl.maximum(soft, dt_low), dt_high)


def time_step_ref(dt: torch.Tensor, dt_bias: torch.Tensor | None,
                  dt_limit: tuple[float, float]) -> torch.Tensor:
    """The model's time step: softplus(dt + dt_bias) in fp32, clamped to dt_limit."""
    x = dt.float() if dt_bias is None else dt.float() + dt_bias.float()
    return F.softplus(x).clamp(min=dt_limit[0], max=dt_limit[1])


def check_dt_limit(dt_limit: tuple[float, float]) -> tuple[float, float]:
    if len(dt_limit) != 2 or not 0.0 <= float(dt_limit[0]) < float(dt_limit[1]):
        raise ValueError(f"dt_limit: need (low, high) with 0 <= low < high, got {dt_limit!r}")
    return float(dt_limit[0]), float(dt_limit[1])


# ---------------------------------------------------------------------- argument checks
def check_rows(slot_ids: torch.Tensor, has_initial_state: torch.Tensor | None,
               cu_seqlens: torch.Tensor | None, num_seqs: int) -> None:
    """The per-sequence index tensors of a call: slot_ids [S] integer, has_initial_state [S]
    bool, cu_seqlens [S + 1] int32."""
    if slot_ids.dim() != 1 or slot_ids.shape[0] != num_seqs:
        raise ValueError(f"slot_ids: expected [{num_seqs}], got {tuple(slot_ids.shape)}")
    if slot_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_ids: must be int32 or int64, got {slot_ids.dtype}")
    if has_initial_state is not None:
        if tuple(has_initial_state.shape) != (num_seqs,) or \
                has_initial_state.dtype != torch.bool:
            raise ValueError(f"has_initial_state: expected bool [{num_seqs}], got "
                             f"{has_initial_state.dtype} {tuple(has_initial_state.shape)}")
    if cu_seqlens is not None:
        if tuple(cu_seqlens.shape) != (num_seqs + 1,) or cu_seqlens.dtype != torch.int32:
            raise ValueError(f"cu_seqlens: expected int32 [{num_seqs + 1}], got "
                             f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")

