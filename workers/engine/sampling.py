"""A sampler whose randomness is a pure function of (seed, position).

Seeded sampling must give the same token wherever it is sampled: on a prefill worker or a
decode worker, in a batch of 1 or 64, with speculation on or off (DESIGN.md, Seams). So there is
no generator state at all: the noise for the token at position p of a request with seed s is
hashed from (s, p, token id). A token is drawn with the Gumbel-max trick,

    token = argmax_v (logits[v] / temperature + g(s, p, v)),   g = -log(-log(u(s, p, v)))

which samples exactly from softmax(logits / temperature) restricted to the top-k / top-p set.

The parameters (SamplingParams) live in baton.workers.sampling_params, torch-free for the
router; what changes the logits before this sampler sees them (penalties, logit_bias,
min_tokens, grammar masks) is baton.workers.engine.logits.

Shapes: [n, V]  n rows (one per token to sample), V vocabulary.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from baton.workers.sampling_params import SamplingParams

_MASK32 = 0xFFFFFFFF
# Two odd 32-bit constants of the "lowbias32" integer hash (Wellons' hash prospector).
_MUL_A = 0x7FEB352D
_MUL_B = 0x846CA68B
_GOLDEN = 0x9E3779B9


def fresh_seed() -> int:
    """A random base seed (an engine without a configured one draws it at start)."""
    return secrets.randbits(63)


def request_seed(base_seed: int, request_id: str) -> int:
    """The seed of a request that did not ask for one: a hash of the engine's base seed and
    the request id, so engines that share a base seed (expert-parallel ranks running the same
    batch) sample the same tokens."""
    digest = hashlib.blake2b(
        request_id.encode("utf-8"), digest_size=8, key=base_seed.to_bytes(8, "little")
    ).digest()
    return int.from_bytes(digest, "little") >> 1


# ---- counter-based noise -------------------------------------------------------------------


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2**32 for x in [0, 2**32) held in int64, split in 16-bit halves so that no
    # intermediate product leaves the non-negative int64 range (no signed overflow anywhere).
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _MUL_A)
    x = x ^ (x >> 15)
    x = _mul32(x, _MUL_B)
    return x ^ (x >> 16)


def _fmix32_int(x: int) -> int:
    x &= _MASK32
    x ^= x >> 16
    x = (x * _MUL_A) & _MASK32
    x ^= x >> 15
    x = (x * _MUL_B) & _MASK32
    return x ^ (x >> 16)


def row_key(seed: int, position: int, stream: int = 0) -> int:
    """A 32-bit key for one (seed, position, stream); the noise of a row derives from it only."""
    h = _fmix32_int(seed ^ _GOLDEN)
    h = _fmix32_int(h ^ (seed >> 32))
    h = _fmix32_int(h ^ (seed >> 64))
    h = _fmix32_int(h ^ position)
    h = _fmix32_int(h ^ (position >> 32))
    return _fmix32_int(h ^ (stream * _GOLDEN))


_TOKEN_HASHES: dict[tuple[int, str], torch.Tensor] = {}


def _token_hashes(vocab: int, device: torch.device | str) -> torch.Tensor:
    # A scrambled bijection of the token ids, [1, V]: keys are mixed into hashes rather than
    # into raw ids, so two rows never see shifted copies of each other's noise.
    key = (vocab, str(device))
    if key not in _TOKEN_HASHES:
        v = torch.arange(vocab, dtype=torch.int64, device=device)
        _TOKEN_HASHES[key] = _fmix32((v + _GOLDEN) & _MASK32).unsqueeze(0)
    return _TOKEN_HASHES[key]


def uniform_noise(keys: Sequence[int], vocab: int, device: torch.device | str) -> torch.Tensor:
    """Uniforms in (0, 1), [n, V] float32: row i, column v is a pure function of (keys[i], v)."""
    k = torch.tensor([int(key) for key in keys], dtype=torch.int64, device=device).unsqueeze(1)
    return unit_interval(_fmix32((_fmix32(_token_hashes(vocab, device) ^ k) + k) & _MASK32))


def unit_interval(bits: torch.Tensor) -> torch.Tensor:
    """32-bit hashes (int64) -> float32 uniforms in [2**-24, 1 - 2**-24]."""
    # 23 high bits plus one half: 24 significant bits, exact in float32. (With 24 bits the top
    # value rounded to 1.0, whose Gumbel noise is +inf: about one row in 128 of a 128k
    # vocabulary took a token regardless of its logit, and a masked one, -inf + inf = nan,
    # despite the mask.)
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def gumbel_noise(keys: Sequence[int], vocab: int, device: torch.device | str) -> torch.Tensor:
    u = uniform_noise(keys, vocab, device)
    return -torch.log(-torch.log(u))


# ---- sampling ------------------------------------------------------------------------------


@dataclass
class SampleRow:
    """One token to sample: whose parameters, and where the token will sit in its sequence."""

    params: SamplingParams
    seed: int
    position: int


def filter_logits(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """logits / temperature with everything outside top-k and top-p set to -inf; [n, V] fp32.

    Only rows with temperature > 0 may be passed.
    """
    n, vocab = logits.shape
    device = logits.device
    temps = torch.tensor([r.params.temperature for r in rows], dtype=torch.float32, device=device)
    x = logits.float() / temps.unsqueeze(1)
    top_k = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows]
    top_p = [float(r.params.top_p) for r in rows]
    if all(k == vocab for k in top_k) and all(p >= 1.0 for p in top_p):
        return x
    sorted_x, order = torch.sort(x, dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device).unsqueeze(0)
    drop = ranks >= torch.tensor(top_k, device=device).unsqueeze(1)
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    probs = torch.softmax(sorted_x, dim=-1)
    # Mass strictly before each token: a token is kept while that mass is below top_p, so the
    # most likely token always stays.
    before = torch.cumsum(probs, dim=-1) - probs
    drop = drop | (before >= torch.tensor(top_p, device=device).unsqueeze(1))
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.full_like(x, float("-inf")).scatter(1, order, sorted_x)


def sample_tokens(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """Choose one token per row of logits [n, V]; returns int64 [n].

    Greedy rows take the argmax; the others take argmax(filtered logits + Gumbel noise keyed on
    (seed, position)), so a row's token depends on its logits and key only.
    """
    n, vocab = logits.shape
    out = torch.argmax(logits, dim=-1)
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        idx = torch.tensor(sampled, dtype=torch.long, device=logits.device)
        sub_rows = [rows[i] for i in sampled]
        x = filter_logits(logits.index_select(0, idx), sub_rows)
        keys = [row_key(r.seed, r.position) for r in sub_rows]
        x = x + gumbel_noise(keys, vocab, logits.device)
        out = out.index_copy(0, idx, torch.argmax(x, dim=-1))
    return out


@dataclass
class TokenLogprobs:
    """Logprob of a chosen token under the model's (untempered) distribution, and the top n."""

    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, top_n: Sequence[int]
) -> list[TokenLogprobs]:
    """Logprobs for rows of logits [n, V] and chosen tokens [n]; top_n[i] alternatives each."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens.view(-1, 1)).squeeze(1).tolist()
    k = max(top_n) if len(top_n) else 0
    if k > 0:
        values, ids = torch.topk(logp, k, dim=-1)
        values, ids = values.tolist(), ids.tolist()
    out = []
    for i, lp in enumerate(chosen):
        top = list(zip(ids[i][: top_n[i]], values[i][: top_n[i]])) if k > 0 else []
        out.append(TokenLogprobs(lp, top))
    return out


# ---- speculative verification with the standard rejection rule ---------------------------

# Noise streams: 0 draws ordinary tokens (and coupled drafts); the rejection rule draws its
# drafts, acceptance uniforms and residual samples from streams of their own.
STREAM_DRAFT = 1
STREAM_ACCEPT = 2
STREAM_RESIDUAL = 3


def draft_tokens(
    logits: torch.Tensor, rows: Sequence[SampleRow]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection-mode drafts: tokens [n] drawn from q = softmax(filtered draft logits) with the
    draft noise stream, and q itself [n, V] (greedy rows: one-hot argmax)."""
    n, vocab = logits.shape
    q = torch.zeros(n, vocab, dtype=torch.float32, device=logits.device)
    tokens = torch.argmax(logits, dim=-1)
    q[torch.arange(n, device=logits.device), tokens] = 1.0
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        idx = torch.tensor(sampled, dtype=torch.long, device=logits.device)
        sub = [rows[i] for i in sampled]
        x = filter_logits(logits.index_select(0, idx), sub)
        keys = [row_key(r.seed, r.position, STREAM_DRAFT) for r in sub]
        chosen = torch.argmax(x + gumbel_noise(keys, vocab, logits.device), dim=-1)
        tokens = tokens.index_copy(0, idx, chosen)
        q = q.index_copy(0, idx, torch.softmax(x, dim=-1))
    return tokens, q


def rejection_verify(
    target_logits: torch.Tensor,
    draft_probs: torch.Tensor,
    drafts: list[int],
    rows: Sequence[SampleRow],
) -> list[int]:
    """The standard speculative-sampling rule for one sequence (Leviathan et al., Chen et al.).

    target_logits [k + 1, V] score positions N..N+k, draft_probs [k, V] are the distributions
    the k drafts were drawn from, rows[i] keys position N + i. Draft i is accepted when
    u_i * q_i(x_i) <= p_i(x_i); the first rejected one is replaced by a sample of
    norm(max(p_i - q_i, 0)); if all are accepted a bonus token is drawn from p_k. Returns the
    emitted tokens (1..k+1). Every draw is keyed on (seed, position, stream), so the result
    does not depend on the batch.
    """
    k, vocab = len(drafts), target_logits.shape[1]
    device = target_logits.device
    if rows[0].params.greedy:
        # p is one-hot on the argmax: accept while the draft is the argmax.
        best = torch.argmax(target_logits, dim=-1).tolist()
        out = []
        for i in range(k):
            out.append(best[i])
            if drafts[i] != best[i]:
                return out
        return [*out, best[k]]
    p = torch.softmax(filter_logits(target_logits, rows), dim=-1)
    keys = [row_key(r.seed, r.position, STREAM_ACCEPT) for r in rows[:k]]
    u = uniform_noise(keys, 1, device)[:, 0].tolist() if k else []
    idx = torch.arange(k, device=device)
    draft_ids = torch.tensor(drafts, dtype=torch.long, device=device)
    p_x = p[idx, draft_ids].tolist() if k else []
    q_x = draft_probs[idx, draft_ids].tolist() if k else []
    for i in range(k):
        if u[i] * q_x[i] <= p_x[i]:
            continue
        residual = torch.clamp(p[i] - draft_probs[i], min=0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: any draw from p will do
            residual = p[i]
        g = gumbel_noise([row_key(rows[i].seed, rows[i].position, STREAM_RESIDUAL)], vocab, device)[
            0
        ]
        token = int(torch.argmax(torch.log(residual) + g))
        return [*drafts[:i], token]
    bonus = sample_tokens(target_logits[k:], rows[k:])
    return [*drafts, int(bonus[0])]
