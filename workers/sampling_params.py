"""SamplingParams: how one request's tokens are chosen, from the HTTP parser to the sampler.

One type everywhere (DESIGN.md, Round 2 seams: output processing): the router's parser builds
it, `to_proto()` puts it on the wire (baton.worker.v1.SamplingParams), the workers read it
back with `from_proto()`, and the engine samples with it. Torch-free: the router imports it.

Conventions, decided here once:
- seed: None = unseeded (the engine derives one from its base seed and the request id);
  otherwise an integer in [0, 2**64), what the wire's uint64 carries. OpenAI's signed seeds
  map in with `seed_from_openai` (seed mod 2**64), so -1 and 2**64 - 1 are the same seed.
- logprobs: None = off; k >= 0 = the chosen token's logprob plus the k most likely
  alternatives. On the wire: logprobs = (k is not None), top_logprobs = k.
- top_k: 0 (or -1) = off; on the wire 0. top_p: 1 = off; the wire's unset 0 reads as 1.
- repetition_penalty: 1 = off; the wire's unset 0 reads as 1.
- logit_bias: {token id: bias}; on the wire repeated TokenBias sorted by token id (a token
  given twice on the wire is refused).
- max_tokens: tokens this call may still generate (a retry asks for the remaining budget);
  min_tokens counts every output token, those of an earlier attempt (Request.num_output_tokens)
  included.
- stop (strings) is text-level and stays in the router: it is not on the wire.
- grammar: an llguidance grammar, its JSON serialization (TopLevelGrammar,
  '{"grammars": [...]}'); "" = unconstrained. Compiled against the checkpoint's tokenizer on
  the workers (baton.workers.engine.grammar).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MAX_LOGPROBS = 20
MAX_SEED = 2**64
PENALTY_RANGE = 2.0  # OpenAI's presence/frequency penalties lie in [-2, 2]
BIAS_RANGE = 100.0  # OpenAI's logit_bias values lie in [-100, 100]


def seed_from_openai(seed: int) -> int:
    """An OpenAI seed (a signed or unsigned 64-bit integer) as SamplingParams.seed."""
    return seed % MAX_SEED


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class SamplingParams:
    """How one request's tokens are chosen and when it stops (conventions: module docstring)."""

    max_tokens: int = 16
    """Most tokens to generate (the first token included)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 (or -1) keeps all."""
    seed: int | None = None
    """Seed of the counter-based noise, in [0, 2**64); None: the engine derives one."""
    stop: list[str] = field(default_factory=list)
    """Strings that end generation; the text is cut before the stop string (router-side)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end generation (besides the tokenizer's eos unless ignore_eos)."""
    logprobs: int | None = None
    """None: no logprobs; k: the chosen token's logprob and the k most likely alternatives."""
    ignore_eos: bool = False
    """Keep generating past the eos token."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token that occurs in the output so far."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per occurrence in the output so far."""
    repetition_penalty: float = 1.0
    """Tokens of the prompt or the output: positive logits divided by it, negative multiplied."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Added to these tokens' logits before sampling."""
    min_tokens: int = 0
    """eos and stop_token_ids cannot be sampled before this many output tokens exist."""
    grammar: str = ""
    """An llguidance grammar (TopLevelGrammar JSON) the output must follow; "" = none."""

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range."""

        def bad(name: str, value: object, allowed: str) -> ValueError:
            return ValueError(f"SamplingParams.{name}={value!r} is invalid: {allowed}")

        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", self.max_tokens, "must be an integer >= 1")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", self.temperature, "must be a finite number >= 0 (0 = greedy)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", self.top_k, "must be an integer >= 0 (0 or -1 = no limit)")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < MAX_SEED):
            raise bad("seed", self.seed, "must be None or an integer in [0, 2**64)")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", self.stop, "must be a list of non-empty strings")
        if isinstance(self.stop_token_ids, str) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise bad("stop_token_ids", self.stop_token_ids, "must be a list of token ids >= 0")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise bad(
                "logprobs",
                self.logprobs,
                f"must be None (off) or an integer in [0, {MAX_LOGPROBS}] (alternatives)",
            )
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", self.ignore_eos, "must be a bool")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -PENALTY_RANGE <= value <= PENALTY_RANGE:
                raise bad(name, value, f"must be a number in [-{PENALTY_RANGE:g}, "
                                       f"{PENALTY_RANGE:g}] (0 = off)")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", self.repetition_penalty,
                      "must be a finite number > 0 (1 = off)")
        if not isinstance(self.logit_bias, dict):
            raise bad("logit_bias", self.logit_bias, "must be a dict of token id -> bias")
        for token, bias in self.logit_bias.items():
            if not _is_int(token) or token < 0:
                raise bad("logit_bias", self.logit_bias, f"token {token!r} is not a token id >= 0")
            if not _is_number(bias) or not -BIAS_RANGE <= bias <= BIAS_RANGE:
                raise bad("logit_bias", self.logit_bias,
                          f"the bias of token {token} must be a number in "
                          f"[-{BIAS_RANGE:g}, {BIAS_RANGE:g}], got {bias!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", self.min_tokens, "must be an integer >= 0")
        if not isinstance(self.grammar, str):
            raise bad("grammar", type(self.grammar).__name__,
                      "must be a string: an llguidance grammar's JSON, or '' for none")

    # ---- derived -------------------------------------------------------------------------

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def num_top_logprobs(self) -> int:
        """How many alternatives to report beside the chosen token's logprob."""
        return self.logprobs or 0

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

    @property
    def has_penalties(self) -> bool:
        """Whether sampling needs the request's token counts (a penalty is on)."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
        )

    # ---- the wire ------------------------------------------------------------------------

    def to_proto(self):
        """baton.worker.v1.SamplingParams of these parameters (stop strings stay behind)."""
        from baton.proto.baton.worker.v1 import worker_pb2

        message = worker_pb2.SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            stop_token_ids=list(self.stop_token_ids),
            logprobs=self.logprobs is not None,
            top_logprobs=self.logprobs or 0,
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=[
                worker_pb2.TokenBias(token_id=t, bias=b) for t, b in sorted(self.logit_bias.items())
            ],
            min_tokens=self.min_tokens,
            grammar=self.grammar,
        )
        if self.seed is not None:
            message.seed = self.seed
        return message

    @classmethod
    def from_proto(cls, message) -> SamplingParams:
        """The parameters a baton.worker.v1.SamplingParams carries, validated (ValueError names
        the field)."""
        bias: dict[int, float] = {}
        for entry in message.logit_bias:
            if entry.token_id in bias:
                raise ValueError(
                    f"SamplingParams.logit_bias is invalid: token {entry.token_id} is given twice"
                )
            bias[int(entry.token_id)] = float(entry.bias)
        wants_logprobs = message.logprobs or message.top_logprobs > 0
        params = cls(
            max_tokens=int(message.max_tokens),
            temperature=float(message.temperature),
            top_p=float(message.top_p) if message.top_p else 1.0,
            top_k=int(message.top_k),
            seed=int(message.seed) if message.HasField("seed") else None,
            stop_token_ids=[int(t) for t in message.stop_token_ids],
            logprobs=int(message.top_logprobs) if wants_logprobs else None,
            ignore_eos=bool(message.ignore_eos),
            presence_penalty=float(message.presence_penalty),
            frequency_penalty=float(message.frequency_penalty),
            repetition_penalty=float(message.repetition_penalty or 1.0),
            logit_bias=bias,
            min_tokens=int(message.min_tokens),
            grammar=message.grammar,
        )
        params.validate()
        return params
