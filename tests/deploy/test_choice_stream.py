"""The one loop behind both APIs' streams and unary answers (deploy/choice_stream.py), on scripted
replica outputs: choice indices, the echoed prompt once per choice, tool calls, usage, failures
in-band and the replicas' streams closed however it ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from moe_serve.cluster.outputs import CompletionDelta, RequestOutput
from moe_serve.cluster.sampler import TokenLogprobs
from moe_serve.deploy.access_log import AccessRecord
from moe_serve.deploy.choice_stream import (
    StreamFailed,
    StreamStep,
    StreamUsage,
    collect_choices,
    stream_choices,
)
from moe_serve.deploy.errors import ApiError
from moe_serve.deploy.metrics import GatewayMetrics
from moe_serve.deploy.structured import ToolPlan

PROMPTS = [[1, 2, 3], [4, 5]]
PROMPT_LOGPROBS = (None, TokenLogprobs(2, -1.0, 1, ()), TokenLogprobs(3, -2.0, 1, ()))


def output(*deltas: CompletionDelta, prompt_logprobs=None, cached: int = 0) -> RequestOutput:
    return RequestOutput("r", deltas, 3, 0, False, prompt_logprobs, cached)


def delta(index: int, text: str, token_ids=(7,), finish: str | None = None) -> CompletionDelta:
    return CompletionDelta(index, text, tuple(token_ids), (), finish)


class Outputs:
    """Scripted (prompt index, output) pairs, then an optional failure; records its closing."""

    def __init__(self, items, failure: Exception | None = None) -> None:
        self.items, self.failure, self.is_closed = items, failure, False

    async def __call__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        try:
            for item in self.items:
                yield item
            if self.failure is not None:
                raise self.failure
        finally:
            self.is_closed = True


def run(outputs: Outputs, n: int = 1, prompts=PROMPTS, **options):
    access = AccessRecord("POST", "/v1/completions")
    tracker = GatewayMetrics().track("m", prompts, access)
    events = stream_choices(outputs(), tracker, prompts, n, **options)

    async def drain():
        return [event async for event in events]

    return asyncio.run(drain()), access


def test_choices_echo_once_and_usage():
    script = Outputs(
        [
            (0, output(delta(0, "a"), delta(1, "b"), prompt_logprobs=PROMPT_LOGPROBS, cached=2)),
            (1, output(delta(0, "c", (8, 9)), delta(1, "d"))),
            (0, output(delta(0, "e", finish="stop"), delta(1, "", (), "length"))),
        ]
    )
    events, access = run(script, n=2, is_echo=True)
    steps, usage = events[:-1], events[-1]
    assert all(isinstance(step, StreamStep) for step in steps)
    indices = [[d.index for d in step.choices] for step in steps]
    assert indices == [[0, 1], [2, 3], [0, 1]]
    echoes = {d.index: d.echo for step in steps for d in step.choices if d.echo is not None}
    assert set(echoes) == {0, 1, 2, 3}  # NOTE: each choice once, on its first delta
    assert echoes[0].prompt_ids == [1, 2, 3] and echoes[0].prompt_logprobs == PROMPT_LOGPROBS
    assert echoes[2].prompt_ids == [4, 5] and echoes[2].prompt_logprobs is None
    assert [d.finish_reason for d in steps[2].choices] == ["stop", "length"]
    assert usage == StreamUsage(5, 6, 2)
    assert access.completion_tokens == 6 and script.is_closed


def test_tool_calls_are_read_out_of_the_text():
    plan = ToolPlan(mode="named", names=("weather",), name="weather")
    script = Outputs(
        [(0, output(delta(0, '{"city": '))), (0, output(delta(0, '"P"}', finish="stop")))]
    )
    events, _ = run(script, prompts=[[1]], plan=plan)
    first, last = events[0].choices[0], events[1].choices[0]
    assert first.text == "" and first.tool_calls[0].name == "weather" and first.tool_calls[0].id
    assert last.tool_calls[0].arguments == '"P"}' and last.finish_reason == "tool_calls"


def test_a_failure_after_the_start_is_the_last_event():
    script = Outputs([(0, output(delta(0, "a")))], ApiError(503, "the model replica failed"))
    events, access = run(script)
    assert isinstance(events[0], StreamStep) and len(events) == 2
    assert isinstance(events[1], StreamFailed) and events[1].error.status == 503
    assert access.status == "503" and script.is_closed


def test_closing_early_closes_the_replicas_streams():
    script = Outputs([(0, output(delta(0, "a"))), (0, output(delta(0, "b")))])
    tracker = GatewayMetrics().track("m", [[1]], AccessRecord("POST", "/x"))

    async def first_only():
        events = stream_choices(script(), tracker, [[1]], 1)
        first = await anext(events)
        await events.aclose()
        return first

    assert asyncio.run(first_only()).choices[0].text == "a" and script.is_closed


def collect(script: Outputs, n: int = 1):
    tracker = GatewayMetrics().track("m", PROMPTS, AccessRecord("POST", "/x"))
    events = stream_choices(script(), tracker, PROMPTS, n, is_echo=True)
    return asyncio.run(collect_choices(events, PROMPTS, n))


def test_collect_accumulates_each_choice():
    script = Outputs(
        [
            (0, output(delta(0, "a"), prompt_logprobs=PROMPT_LOGPROBS)),
            (1, output(delta(0, "c", finish="stop"))),
            (0, output(delta(0, "b", (8,), "length"))),
        ]
    )
    result = collect(script)
    assert [(c.text, c.token_ids, c.finish_reason) for c in result.choices] == [
        ("ab", [7, 8], "length"),
        ("c", [7], "stop"),
    ]
    assert result.runs[0].prompt_logprobs == PROMPT_LOGPROBS and result.runs[1].prompt_ids == [4, 5]
    assert result.usage == StreamUsage(5, 3, 0)


def test_collect_raises_the_failure():
    with pytest.raises(ApiError, match="queue"):
        collect(Outputs([], ApiError(429, "queue full")))
