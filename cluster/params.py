"""Per-request sampling parameters, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass

MAX_LOGPROBS = 20
MAX_N = 16  # completions per request


class RequestError(ValueError):
    """A request the engine rejects before doing any work (bad parameters, too long...)."""


GRAMMAR_KINDS = ("json_schema", "regex", "lark")


@dataclass(frozen=True)
class StructuredOutput:
    """A grammar every completion must match (compiled by llguidance: cluster/grammar.py).
    The completion finishes ("stop") once the grammar is complete."""

    kind: str  # "json_schema" (text: the schema as JSON), "regex" or "lark"
    text: str

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise RequestError(f"grammar kind must be one of {GRAMMAR_KINDS}, got {self.kind!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request's completions; `temperature == 0` means greedy."""

    max_tokens: int | None = 16  # None: up to the model's context length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k filter
    min_p: float = 0.0
    seed: int | None = None  # sequence i of the request uses seed + i
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()  # NOTE: a matched stop string is not returned
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token (the sampled one always)
    prompt_logprobs: int | None = None  # for `echo`: logprobs of the prompt tokens
    skip_special_tokens: bool = True
    structured: StructuredOutput | None = None  # constrain the output to a grammar

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be at least 1"),
            (0.0 <= self.temperature <= 100.0, "temperature must be in [0, 100]"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (self.top_k >= -1, "top_k must be -1, 0 (disabled) or positive"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (1 <= self.n <= MAX_N, f"n must be in [1, {MAX_N}]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (0.0 < self.repetition_penalty <= 10.0, "repetition_penalty must be in (0, 10]"),
            (all(self.stop), "stop strings must not be empty"),  # NOTE: counts: deploy/limits.py
            (all(t >= 0 for t in self.stop_token_ids), "stop_token_ids must be non-negative"),
            (self.seed is None or 0 <= self.seed < 2**63, "seed must be in [0, 2^63)"),
        ]
        for value, name in ((self.logprobs, "logprobs"), (self.prompt_logprobs, "prompt_logprobs")):
            checks.append(
                (
                    value is None or 0 <= value <= MAX_LOGPROBS,
                    f"{name} must be in [0, {MAX_LOGPROBS}]",
                )
            )
        for ok, message in checks:
            if not ok:
                raise RequestError(message)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


@dataclass(frozen=True)
class RequestLimits:
    """What a model accepts; checked before any work (also by front ends, for fast errors)."""

    vocab_size: int
    max_model_len: int

    def check(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Raise RequestError for an unservable request; returns its resolved max_tokens."""
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        bad = [t for t in (*prompt_ids, *params.stop_token_ids) if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(
                f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
            )
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens; this model's "
                f"max_model_len is {self.max_model_len}"
            )
        if params.max_tokens is not None and params.max_tokens > room:
            raise RequestError(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens "
                f"({params.max_tokens}) exceeds max_model_len {self.max_model_len}"
            )
        return params.max_tokens or room
