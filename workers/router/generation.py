"""One request's choices on the backend: their token streams as output events.

A request has one choice per prompt and per `n`. Every choice opens before anything is
streamed (the request is admitted once, for all its choices): choice 0 first, its first token
being the request's time to first token, then the others at once, with the same cache_key, so
that a prefix cache holding choice 0's prompt serves theirs. Each choice's tokens go through
its own ChoiceOutput (output.py); `events()` yields `ChoiceEvent`s from all choices as they
come, and ends once every choice finished.

Errors: opening any choice raises what the HTTP layer turns into an error response; later
failures (a worker lost after its retry, the deadline) raise WorkerFailure / TimeoutError
out of `events()`, which the front end reports in the body or the stream. `close()` closes
every backend stream still open, which cancels the work left on the workers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from baton.workers.metrics import BatonMetrics
from baton.workers.router.backend import GenerationRequest, TokenOutput, WorkerFailure
from baton.workers.router.output import ChoiceOutput, Delta

Opener = Callable[[GenerationRequest], Awaitable[tuple[AsyncIterator[TokenOutput],
                                                      TokenOutput]]]


@dataclass
class Choice:
    """One choice: what it asks the backend for, and how its output is read."""

    index: int
    prompt_index: int  # which of the request's prompts (usage counts each prompt once)
    gen: GenerationRequest
    output: ChoiceOutput
    echo: str = ""  # completions with echo: the prompt's text, before the output
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None
    error: dict[str, Any] | None = None  # finish_reason "error": what went wrong


@dataclass
class ChoiceEvent:
    """What one token (or the end) of a choice produced."""

    index: int
    deltas: list[Delta]
    entry: dict[str, Any] | None = None  # the token's logprob entry, when asked for
    finish_reason: str | None = None  # set on the choice's last event
    error: dict[str, Any] | None = None  # finish_reason "error": what went wrong


@dataclass
class _Finished:
    index: int


@dataclass
class _Failed:
    error: BaseException


@dataclass
class Generation:
    request_id: str  # the client's (x-request-id, or one the router made)
    choices: list[Choice]
    open_choice: Opener
    metrics: BatonMetrics
    logprobs: int | None = None  # None: off; k: chosen token plus k alternatives
    token_name: Callable[[int], str] = str
    delivered: bool = False
    """The stream's last event ([DONE]) was written: the client has the whole answer, even
    if its connection closes before the response is finished off."""
    _streams: dict[int, AsyncIterator[TokenOutput]] = field(default_factory=dict)
    on_freed: Callable[[], None] | None = None
    """Called as a choice that finished before the others gives its workers back."""
    freed: int = 0  # choices that gave their workers back before the request ended
    _firsts: dict[int, TokenOutput] = field(default_factory=dict)
    _t_arrival: float = 0.0
    _tasks: list[asyncio.Task] = field(default_factory=list)

    async def open(self, t_arrival: float) -> None:
        """Open every choice up to its first token: choice 0 first (a prefix cache then holds
        its prompt for the others), then the others at once. A request takes room for all
        its choices before anything is streamed, or none: when one fails to open, those
        opened are closed and its error is raised."""
        self._t_arrival = t_arrival
        stream, first = await self.open_choice(self.choices[0].gen)
        self._streams[0], self._firsts[0] = stream, first
        rest = self.choices[1:]
        if not rest:
            return
        opened = await asyncio.gather(*(self.open_choice(c.gen) for c in rest),
                                      return_exceptions=True)
        error: BaseException | None = None
        for choice, got in zip(rest, opened):
            if isinstance(got, BaseException):
                error = error or got
            else:
                self._streams[choice.index], self._firsts[choice.index] = got
        if error is not None:
            await self.close()
            raise error

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)

    def usage(self) -> dict[str, Any]:
        prompts: dict[int, int] = {}
        cached: dict[int, int] = {}
        for c in self.choices:
            prompts[c.prompt_index] = len(c.gen.prompt_ids)
            cached.setdefault(c.prompt_index, c.cached_tokens)
        prompt = sum(prompts.values())
        completion = self.completion_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(cached.values())},
            "completion_tokens_details": {
                "reasoning_tokens": sum(c.output.reasoning_tokens for c in self.choices)},
        }

    def _entry(self, out: TokenOutput) -> dict[str, Any] | None:
        if self.logprobs is None or out.token_id is None:
            return None
        name = self.token_name
        return {"token": name(out.token_id), "logprob": out.logprob,
                "top": [(name(t), lp) for t, lp in out.top_logprobs[: self.logprobs]]}

    async def _choice_events(self, choice: Choice, stream: AsyncIterator[TokenOutput],
                             out: TokenOutput, observe: bool) -> AsyncIterator[ChoiceEvent]:
        """One choice's events from its first token on. observe: this choice's timing is
        the request's (the client-visible SLO metrics: TTFT, and the mean gap between output
        tokens, since speculative decoding delivers tokens in bursts)."""
        t_first = time.monotonic()
        t_last = t_first
        if observe:
            self.metrics.time_to_first_token.observe(t_first - self._t_arrival)
        choice.cached_tokens = out.cached_tokens or 0
        output = choice.output
        if choice.echo:
            yield ChoiceEvent(choice.index, [Delta(content=choice.echo)])
        try:
            while True:
                deltas: list[Delta] = []
                refused = out.finish_reason == GRAMMAR_ERROR
                if out.token_id is not None:
                    choice.completion_tokens += 1
                    t_last = time.monotonic()
                    if not refused:  # a token the grammar refused is no part of the answer
                        deltas = output.push(out.token_id)
                reason = None
                if refused:
                    deltas += output.finish()
                    choice.finish_reason = "error"
                    choice.error = grammar_refusal(out.token_id)
                    self.metrics.grammar_refused_tokens.inc()
                    yield ChoiceEvent(choice.index, deltas, self._entry(out), "error",
                                      choice.error)
                    return
                if output.stopped:
                    reason = output.finish_reason(None)
                elif out.finish_reason is not None:
                    deltas += output.finish()
                    reason = output.finish_reason(out.finish_reason)
                choice.finish_reason = reason
                yield ChoiceEvent(choice.index, deltas, self._entry(out), reason)
                if reason is not None:
                    return
                remaining = choice.gen.deadline - time.time()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                try:
                    out = await asyncio.wait_for(stream.__anext__(), remaining)
                except StopAsyncIteration:
                    raise WorkerFailure("the token stream ended without a finish reason") \
                        from None
        finally:
            if observe and choice.completion_tokens > 1:
                self.metrics.inter_token_latency.observe(
                    (t_last - t_first) / (choice.completion_tokens - 1))
            # A finished choice frees its workers now, not when the whole request ends.
            if choice.index in self._streams and choice.finish_reason is not None:
                await asyncio.shield(self._streams.pop(choice.index).aclose())
                if len(self.choices) > 1:
                    self.freed += 1
                    if self.on_freed is not None:
                        self.on_freed()

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        """Every choice's events, as they come (choice 0 must be open)."""
        assert len(self._firsts) == len(self.choices), "open() first"
        if len(self.choices) == 1:
            async for event in self._choice_events(self.choices[0], self._streams[0],
                                                   self._firsts[0], observe=True):
                yield event
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            try:
                stream, first = self._streams[choice.index], self._firsts[choice.index]
                async for event in self._choice_events(choice, stream, first,
                                                       observe=choice.index == 0):
                    await queue.put(event)
                await queue.put(_Finished(choice.index))
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # reported by events(), which cancels the rest
                await queue.put(_Failed(exc))

        self._tasks = [asyncio.create_task(pump(c)) for c in self.choices]
        running = len(self.choices)
        while running:
            item = await queue.get()
            if isinstance(item, _Failed):
                raise item.error
            if isinstance(item, _Finished):
                running -= 1
            else:
                yield item

    async def close(self) -> None:
        """Stop what still runs and close every backend stream (shielded: it completes even
        when the handler is being cancelled)."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            await asyncio.shield(stream.aclose())


GRAMMAR_ERROR = "grammar_error"  # the workers' finish reason for a refused token


def grammar_refusal(token_id: int | None) -> dict[str, Any]:
    """The error a choice reports when the grammar refused the token the model sampled."""
    return {"message": f"the output grammar refused the token the model sampled (id "
                       f"{token_id}); the output ends before it", "type": "server_error",
            "code": "grammar_refused_token"}


def choice_seed(seed: int | None, j: int) -> int | None:
    """Choice j's seed (j counts a prompt's n choices): the request's seed for choice 0, a
    deterministic mix of (seed, j) for the others, so that a seeded request with n > 1 is
    reproducible and its choices differ."""
    if seed is None or j == 0:
        return seed
    x = (seed + 0x9E3779B97F4A7C15 * j) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return x ^ (x >> 31)

