"""What the engine streams back per request, and the per-request bookkeeping behind it."""

from __future__ import annotations

from collections.abc import Sequence as Outputs
from dataclasses import dataclass, field, replace
from typing import Any

from moe_serve.cluster.detokenizer import TextStream
from moe_serve.cluster.params import SamplingParams
from moe_serve.cluster.sampler import SamplingRow, TokenLogprobs
from moe_serve.cluster.sequence import Sequence


@dataclass(frozen=True)
class CompletionDelta:
    """News about one of a request's `n` completions since the previous output."""

    index: int  # which completion (0..n-1)
    text: str  # new text (a withheld possible stop-string prefix comes later)
    token_ids: tuple[int, ...]  # new tokens
    logprobs: tuple[TokenLogprobs, ...]  # one per new token when logprobs were asked
    finish_reason: str | None  # "stop", "length", "abort" once finished (a completed
    # grammar is "stop")


@dataclass(frozen=True)
class RequestOutput:
    """One streamed update of a request."""

    request_id: str
    deltas: tuple[CompletionDelta, ...]
    num_prompt_tokens: int
    num_output_tokens: int  # so far, over all completions
    finished: bool
    # First output after the prompt is processed, when prompt logprobs were asked:
    # one entry per prompt token (None for the first token).
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None
    # Prompt tokens served from the prefix cache (OpenAI's prompt_tokens_details.cached_tokens):
    # the first sample's figure at its first admission (0 before it is admitted).
    num_cached_tokens: int = 0


def merge_outputs(outputs: Outputs[RequestOutput]) -> RequestOutput:
    """Consecutive outputs of one request as one: each completion's deltas joined in order,
    the rest as of the last (what a reader that fell behind, or one that only wants the end,
    receives in a single message)."""
    if len(outputs) == 1:
        return outputs[0]
    runs: dict[int, list[CompletionDelta]] = {}
    for output in outputs:
        for delta in output.deltas:
            runs.setdefault(delta.index, []).append(delta)
    deltas = tuple(
        CompletionDelta(
            index,
            "".join(d.text for d in run),
            tuple(t for d in run for t in d.token_ids),
            tuple(lp for d in run for lp in d.logprobs),
            run[-1].finish_reason,
        )
        for index, run in sorted(runs.items())
    )
    prompt_logprobs = next(
        (o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None
    )
    return replace(outputs[-1], deltas=deltas, prompt_logprobs=prompt_logprobs)


@dataclass
class RequestState:
    """Everything the engine keeps about a request between steps."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    rows: list[SamplingRow]
    streams: list[TextStream]
    matchers: list[Any]  # per sample: its llguidance matcher, or None when unconstrained
    pending_tokens: list[list[int]] = field(default_factory=list)
    pending_logprobs: list[list[TokenLogprobs]] = field(default_factory=list)
    prompt_logprobs: dict[int, TokenLogprobs] = field(default_factory=dict)
    is_prompt_logprobs_sent: bool = False

    def __post_init__(self) -> None:
        self.pending_tokens = [[] for _ in self.seqs]
        self.pending_logprobs = [[] for _ in self.seqs]

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

    def take_prompt_logprobs(self) -> tuple[TokenLogprobs | None, ...] | None:
        """All prompt logprobs once they are complete and not yet sent."""
        wanted = self.params.prompt_logprobs is not None and not self.is_prompt_logprobs_sent
        if not wanted or len(self.prompt_logprobs) < len(self.prompt_ids) - 1:
            return None
        self.is_prompt_logprobs_sent = True
        return (None, *(self.prompt_logprobs[p] for p in range(1, len(self.prompt_ids))))

    def take_output(self, changed: set[int]) -> RequestOutput:
        """Deltas of the completions in `changed` (indices), clearing what they carried."""
        deltas = []
        for i in sorted(changed):
            seq, stream = self.seqs[i], self.streams[i]
            deltas.append(
                CompletionDelta(
                    i,
                    stream.delta(seq.is_finished),
                    tuple(self.pending_tokens[i]),
                    tuple(self.pending_logprobs[i]),
                    seq.finish_reason,
                )
            )
            self.pending_tokens[i], self.pending_logprobs[i] = [], []
        return RequestOutput(
            self.request_id,
            tuple(deltas),
            len(self.prompt_ids),
            sum(seq.num_output_tokens for seq in self.seqs),
            self.is_finished,
            self.take_prompt_logprobs(),
            self.seqs[0].num_cached_tokens or 0,
        )
