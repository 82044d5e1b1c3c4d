"""Open-loop load for the end-to-end benchmark: a schedule of long and short prompts at fixed
rates, streamed through the OpenAI completions API, and the latency figures it yields.

Each request is sent at its scheduled time whether or not earlier ones finished (open loop:
a slow server builds a queue, as real traffic would). Prompts are token ids (exact lengths)
and ask for `ignore_eos`, `logprobs` and `return_tokens_as_token_ids`, so that every SSE
chunk carries its tokens by id (a token whose text is a partial UTF-8 sequence would
otherwise arrive with the next); timed runs ask for no alternatives (`logprobs: 0`).

Requests still running --drain seconds after the last arrival are cut off and counted apart
(an overloaded server); TTFT and ITL cover the completed requests.

    TTFT  send -> first token, per request
    ITL   gap between consecutive tokens of a request, all gaps of all requests pooled
          (tokens arriving in one chunk count as gaps of 0)
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field

import httpx

KINDS = ("long", "short")
QUANTILES = (50, 90, 99)
CUT_OFF = "cut off: still running when the drain time after the last arrival ran out"


@dataclass(frozen=True)
class Arrival:
    at: float
    """Seconds after the start of the run."""
    kind: str
    """long | short"""
    prompt: tuple[int, ...]


@dataclass(frozen=True)
class Workload:
    long_rate: float
    """Long prompts per second (0: none)."""
    short_rate: float
    """Short prompts per second (0: none)."""
    duration_s: float
    """Arrivals fall in [0, duration_s)."""
    long_len: int
    short_len: int
    output_len: int
    """Tokens every request generates (eos ignored)."""
    vocab_size: int
    seed: int = 0
    arrivals: str = "poisson"
    """poisson (exponential gaps) | uniform (evenly spaced, half a gap in)."""

    def validate(self) -> None:
        for name in ("long_rate", "short_rate"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name}: {value!r} must be a finite number >= 0")
        if self.long_rate == 0 and self.short_rate == 0:
            raise ValueError("long_rate, short_rate: at least one must be > 0")
        if not self.duration_s > 0:
            raise ValueError(f"duration_s: {self.duration_s!r} must be > 0")
        for name in ("long_len", "short_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)!r} must be >= 1")
        if self.vocab_size < 6:
            raise ValueError(f"vocab_size: {self.vocab_size!r} must leave ids past the "
                             "5 special tokens")
        if self.arrivals not in ("poisson", "uniform"):
            raise ValueError(f"arrivals: {self.arrivals!r} is not one of poisson, uniform")


def schedule(w: Workload) -> list[Arrival]:
    """The arrivals of a workload in time order; the same workload gives the same list."""
    w.validate()
    rng = random.Random(w.seed)
    out = []
    for kind, rate, length in (("long", w.long_rate, w.long_len),
                               ("short", w.short_rate, w.short_len)):
        if rate == 0:
            continue
        t = rng.expovariate(rate) if w.arrivals == "poisson" else 0.5 / rate
        while t < w.duration_s:
            # Ids 0..4 are the special tokens of the benchmark checkpoints' tokenizer.
            prompt = tuple(rng.randrange(5, w.vocab_size) for _ in range(length))
            out.append(Arrival(t, kind, prompt))
            t += rng.expovariate(rate) if w.arrivals == "poisson" else 1.0 / rate
    return sorted(out, key=lambda a: a.at)


@dataclass
class Outcome:
    kind: str
    sent_at: float
    token_times: list[float] = field(default_factory=list)
    error: str | None = None
    token_ids: list[int] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)
    """Per token, top-1 minus top-2 logprob (when alternatives were asked for)."""

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.sent_at

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


async def stream_one(client: httpx.AsyncClient, base_url: str, model: str, arrival: Arrival,
                     output_len: int, alternatives: int = 0) -> Outcome:
    """One streamed greedy request; alternatives >= 2 also records each token's margin."""
    body = {"model": model, "prompt": list(arrival.prompt), "max_tokens": output_len,
            "temperature": 0, "stream": True, "ignore_eos": True, "logprobs": alternatives,
            "return_tokens_as_token_ids": True}
    outcome = Outcome(arrival.kind, time.monotonic())
    try:
        async with client.stream("POST", f"{base_url}/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                outcome.error = f"HTTP {response.status_code}: {text[:200]}"
                return outcome
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    outcome.error = f"stream error: {chunk['error'].get('message', chunk)}"
                    return outcome
                now = time.monotonic()
                for choice in chunk.get("choices", []):
                    logprobs = choice.get("logprobs") or {}
                    tokens = logprobs.get("tokens", [])
                    outcome.token_times += [now] * len(tokens)
                    outcome.token_ids += [int(t.removeprefix("token_id:")) for t in tokens]
                    if alternatives >= 2:
                        tops = logprobs.get("top_logprobs") or []
                        outcome.margins += [_margin(top) for top in tops]
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, ValueError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
        return outcome
    if len(outcome.token_times) != output_len:
        outcome.error = f"{len(outcome.token_times)} tokens streamed, expected {output_len}"
    return outcome


def _margin(top: dict[str, float] | None) -> float:
    values = sorted((top or {}).values(), reverse=True)
    return values[0] - values[1] if len(values) >= 2 else math.inf


def greedy_agreement(reference: list[Outcome], other: list[Outcome],
                     min_margin: float) -> tuple[int, int]:
    """(requests whose tokens agree, requests compared) between two runs of the same
    arrivals. Tokens must be equal, except that they may part where either run's top-1/top-2
    margin is below min_margin (there rounding may pick either token; after it the sequences
    legitimately differ). Without margins every difference counts."""
    agree = compared = 0
    for a, b in zip(reference, other, strict=True):
        if a.error is not None or b.error is not None:
            continue
        compared += 1
        for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)):
            if x != y:
                agree += min(_at(a.margins, i), _at(b.margins, i)) < min_margin
                break
        else:
            agree += len(a.token_ids) == len(b.token_ids)
    return agree, compared


def _at(margins: list[float], i: int) -> float:
    return margins[i] if i < len(margins) else math.inf


async def run_load(base_url: str, model: str, arrivals: list[Arrival], output_len: int,
                   timeout_s: float, drain_s: float = math.inf,
                   alternatives: int = 0) -> tuple[list[Outcome], float]:
    """Sends every arrival at its time; the outcomes and the wall time of the whole run.

    Requests still running drain_s after the last arrival are cancelled (closing the stream
    frees their work on the server) and come back with error CUT_OFF: an overloaded server
    would otherwise keep the run going for as long as its queue takes.
    """
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(timeout_s, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        start = time.monotonic()

        async def at_time(arrival: Arrival) -> Outcome:
            await asyncio.sleep(max(0.0, start + arrival.at - time.monotonic()))
            return await stream_one(client, base_url, model, arrival, output_len, alternatives)

        tasks = [asyncio.create_task(at_time(a)) for a in arrivals]
        last = max((a.at for a in arrivals), default=0.0)
        limit = None if math.isinf(drain_s) else max(0.0, start + last + drain_s - time.monotonic())
        done, pending = await asyncio.wait(tasks, timeout=limit) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.monotonic() - start
        outcomes = [task.result() if task in done else Outcome(arrival.kind, start + arrival.at,
                                                                 error=CUT_OFF)
                    for task, arrival in zip(tasks, arrivals)]
        return outcomes, wall


def percentiles(values: list[float], qs: tuple[int, ...] = QUANTILES) -> list[float]:
    """Linear-interpolated percentiles (numpy's default); NaN for an empty list."""
    if not values:
        return [math.nan] * len(qs)
    ordered = sorted(values)
    out = []
    for q in qs:
        pos = (len(ordered) - 1) * q / 100
        lo = math.floor(pos)
        hi = min(lo + 1, len(ordered) - 1)
        out.append(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))
    return out


@dataclass
class Summary:
    mode: str
    long_rate: float
    sent: dict[str, int]
    """Requests sent per kind."""
    failed: int
    """Requests that ended in an error (cut-off ones not included)."""
    cut_off: int
    """Requests still running when the drain time ran out (an overloaded server)."""
    ttft: list[float]
    """p50, p90, p99 of every completed request's TTFT (s)."""
    ttft_by_kind: dict[str, list[float]]
    itl: list[float]
    """p50, p90, p99 of every gap (s)."""
    output_tokens_per_s: float
    wall_s: float
    errors: list[str]


def summarize(mode: str, long_rate: float, outcomes: list[Outcome], wall_s: float) -> Summary:
    done = [o for o in outcomes if o.error is None]
    cut_off = sum(o.error == CUT_OFF for o in outcomes)
    return Summary(
        mode=mode, long_rate=long_rate,
        sent={k: sum(o.kind == k for o in outcomes) for k in KINDS},
        failed=len(outcomes) - len(done) - cut_off, cut_off=cut_off,
        ttft=percentiles([o.ttft for o in done]),
        ttft_by_kind={k: percentiles([o.ttft for o in done if o.kind == k]) for k in KINDS},
        itl=percentiles([g for o in done for g in o.gaps()]),
        output_tokens_per_s=sum(len(o.token_times) for o in done) / wall_s if wall_s else 0.0,
        wall_s=wall_s,
        errors=sorted({o.error for o in outcomes if o.error not in (None, CUT_OFF)})[:5])
