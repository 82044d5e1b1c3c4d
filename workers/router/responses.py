"""From a backend's token stream to OpenAI response bodies.

`Generation` follows one request's tokens: text deltas through the TextAssembler (stop
strings), token counts for usage, logprob entries, the finish reason, and the router's SLO
observations. The helpers below shape logprobs the way each endpoint returns them and frame
server-sent events.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from baton.workers.metrics import BatonMetrics
from baton.workers.router.backend import GenerationRequest, TokenOutput, WorkerFailure
from baton.workers.router.params import ParsedRequest
from baton.workers.router.text import TextAssembler


class Generation:
    """One request's token stream turned into text: counts, logprobs and the finish reason."""

    def __init__(self, parsed: ParsedRequest, gen: GenerationRequest, client_request_id: str,
                 decode: Callable[[Sequence[int]], str], metrics: BatonMetrics) -> None:
        self.parsed = parsed
        self.gen = gen
        self.client_request_id = client_request_id
        self._decode = decode
        self._metrics = metrics
        self.text = TextAssembler(decode, parsed.sampling.stop, gen.prompt_ids)
        self.completion_tokens = 0
        self.cached_tokens = 0  # prompt tokens served from a prefix cache
        self.finish_reason: str | None = None
        self.delivered = False
        """A stream's last event ([DONE]) was written: the client has the whole answer, even
        if its connection closes before the response is finished off."""

    def token_entry(self, out: TokenOutput) -> dict[str, Any] | None:
        if self.parsed.sampling.logprobs is None:
            return None
        if self.parsed.tokens_as_ids:
            def name(t: int) -> str:
                return f"token_id:{t}"
        else:
            def name(t: int) -> str:
                return self._decode([t])
        return {
            "token": name(out.token_id),
            "logprob": out.logprob,
            "top": [(name(t), lp) for t, lp in out.top_logprobs[: self.parsed.sampling.logprobs]],
        }

    async def events(
        self, stream: AsyncIterator[TokenOutput], first: TokenOutput, t_arrival: float
    ) -> AsyncIterator[tuple[str, dict[str, Any] | None]]:
        """Yields (text delta, logprob entry) per token; sets finish_reason at the end.

        Observes the client-visible SLO metrics: time to first token, and the request's mean
        gap between output tokens (the ITL target is per request, DESIGN.md; speculative
        decoding delivers tokens in bursts, so single gaps would flatter it).
        """
        metrics = self._metrics
        t_first = time.monotonic()
        t_last = t_first
        metrics.time_to_first_token.observe(t_first - t_arrival)
        out: TokenOutput | None = first
        self.cached_tokens = first.cached_tokens or 0
        try:
            while True:
                if out.token_id is not None:
                    self.completion_tokens += 1
                    t_last = time.monotonic()
                    delta = self.text.push(out.token_id)
                else:
                    delta = ""
                if not self.text.stopped and out.finish_reason is not None:
                    delta += self.text.finish()
                if self.text.stopped:
                    self.finish_reason = "stop"
                elif out.finish_reason is not None:
                    self.finish_reason = out.finish_reason
                yield delta, self.token_entry(out) if out.token_id is not None else None
                if self.finish_reason is not None:
                    return
                remaining = self.gen.deadline - time.time()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                try:
                    out = await asyncio.wait_for(stream.__anext__(), remaining)
                except StopAsyncIteration:
                    raise WorkerFailure("the token stream ended without a finish reason") from None
        finally:
            if self.completion_tokens > 1:
                metrics.inter_token_latency.observe(
                    (t_last - t_first) / (self.completion_tokens - 1))

    def usage(self) -> dict[str, Any]:
        prompt = len(self.gen.prompt_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


def completion_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    tokens, token_logprobs, top, offsets = [], [], [], []
    for e in entries:
        tokens.append(e["token"])
        token_logprobs.append(e["logprob"])
        top.append({t: lp for t, lp in e["top"]} if e["top"] else None)
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
            "text_offset": offsets}


def chat_logprob(e: dict[str, Any]) -> dict[str, Any]:
    def item(token: str, lp: float) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8"))}

    entry = item(e["token"], e["logprob"])
    entry["top_logprobs"] = [item(t, lp) for t, lp in e["top"]]
    return entry


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
