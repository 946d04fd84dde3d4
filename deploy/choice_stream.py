"""One request's outputs as per-choice events: the loop behind both APIs' streams and unary
answers (metrics tracking, token counts, the echoed prompt once per choice, tool calls read out
of the text, errors after the start, and cancelling the replicas' streams however it ends). The
APIs only format its events: SSE chunks, protobuf messages, one body."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from moe_serve.cluster.outputs import CompletionDelta, RequestOutput
from moe_serve.cluster.sampler import TokenLogprobs
from moe_serve.deploy.errors import ApiError, as_api_error
from moe_serve.deploy.metrics import RequestTracker
from moe_serve.deploy.structured import ToolPlan
from moe_serve.deploy.tool_calls import ToolCallDelta, ToolCallReader


@dataclass(frozen=True)
class PromptRun:
    """One prompt of a request: its ids, and (for echo) its logprobs."""

    prompt_ids: list[int]
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None


@dataclass(frozen=True)
class ChoiceDelta:
    """News about one choice of the response (prompt i, sample j -> choice i * n + j): its new
    text once tool calls are read out of it, and those calls."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs, ...]
    finish_reason: str | None  # as the APIs report it: "tool_calls" once a call was made
    tool_calls: tuple[ToolCallDelta, ...] = ()
    echo: PromptRun | None = None  # on the choice's first delta, when the prompt is echoed


@dataclass(frozen=True)
class StreamStep:
    """One output of the replicas: the choices it moved on."""

    choices: tuple[ChoiceDelta, ...]


@dataclass(frozen=True)
class StreamUsage:
    """The last event of a request that completed."""

    num_prompt_tokens: int
    num_completion_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache


@dataclass(frozen=True)
class StreamFailed:
    """The last event of a request that failed once started (its response may have begun)."""

    error: ApiError


StreamEvent = StreamStep | StreamUsage | StreamFailed
TEXT = ToolPlan()  # the completion read as text only


class _ChoiceReader:
    """Turns the replicas' deltas into ChoiceDeltas: one tool-call reader per choice."""

    def __init__(self, prompts: list[list[int]], n: int, is_echo: bool, plan: ToolPlan) -> None:
        self.prompts, self.n, self.is_echo, self.plan = prompts, n, is_echo, plan
        self.readers: dict[int, ToolCallReader] = {}

    def read(self, prompt_index: int, output: RequestOutput, delta: CompletionDelta):
        index = prompt_index * self.n + delta.index
        echo = None
        if index not in self.readers:
            self.readers[index] = ToolCallReader(self.plan)
            if self.is_echo:
                echo = PromptRun(self.prompts[prompt_index], output.prompt_logprobs)
        reader = self.readers[index]
        text, calls = reader.feed(delta.text, delta.finish_reason is not None)
        return ChoiceDelta(
            index,
            text,
            delta.token_ids,
            delta.logprobs,
            reader.finish_reason(delta.finish_reason),
            tuple(calls),
            echo,
        )


async def stream_choices(
    outputs: AsyncIterator[tuple[int, RequestOutput]],
    tracker: RequestTracker,
    prompts: list[list[int]],
    n: int,
    is_echo: bool = False,
    plan: ToolPlan = TEXT,
) -> AsyncIterator[StreamEvent]:
    """A StreamStep per output of `outputs` ((prompt index, output), as GatewayCore merges
    them), then StreamUsage; or, from the failure on, StreamFailed. Closing it early (a client
    gone) closes `outputs`, which cancels the request on the replicas."""
    choices, num_completion = _ChoiceReader(prompts, n, is_echo, plan), 0
    try:
        async for prompt_index, output in outputs:
            tracker.on_output(prompt_index, output)
            num_completion += sum(len(delta.token_ids) for delta in output.deltas)
            yield StreamStep(tuple(choices.read(prompt_index, output, d) for d in output.deltas))
        tracker.done()
        yield StreamUsage(sum(map(len, prompts)), num_completion, tracker.num_cached_tokens)
    except Exception as exc:  # NOTE: a stream's headers are sent: the error goes in-band
        error = as_api_error(exc)
        tracker.fail(error.status)
        yield StreamFailed(error)
    finally:
        await outputs.aclose()


@dataclass
class ChoiceState:
    """One completion accumulated from its deltas."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, delta: ChoiceDelta) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        self.finish_reason = delta.finish_reason


@dataclass(frozen=True)
class Collected:
    """A request run to completion."""

    runs: list[PromptRun]  # per prompt, with its logprobs when they were asked
    choices: list[ChoiceState]  # per choice: prompt i, sample j -> i * n + j
    usage: StreamUsage


async def collect_choices(
    events: AsyncIterator[StreamEvent], prompts: list[list[int]], n: int
) -> Collected:
    """Accumulate `stream_choices` (echo on, to learn the prompts' logprobs); raises its
    failure. NOTE: with text-mode reading: the unary bodies read tool calls out of the whole
    text."""
    runs = [PromptRun(ids) for ids in prompts]
    choices = [ChoiceState() for _ in range(len(prompts) * n)]
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, StreamFailed):
                raise event.error
            if isinstance(event, StreamUsage):
                return Collected(runs, choices, event)
            for delta in event.choices:
                if delta.echo is not None and delta.echo.prompt_logprobs is not None:
                    runs[delta.index // n] = delta.echo
                choices[delta.index].add(delta)
    raise RuntimeError("the request's events ended without usage")
