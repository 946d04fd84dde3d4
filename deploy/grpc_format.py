"""gRPC response messages (`moeserving.v1`): choices with their logprobs and tool calls, usage,
stream messages and the model list."""

from __future__ import annotations

import math

from moe_serve.cluster.sampler import TokenLogprobs
from moe_serve.deploy.choice_stream import (
    ChoiceDelta,
    ChoiceState,
    PromptRun,
    StreamStep,
    StreamUsage,
)
from moe_serve.deploy.gateway_core import ModelInfo
from moe_serve.deploy.structured import ToolPlan
from moe_serve.deploy.tool_calls import ToolCallDelta, ToolCallReader, merge_deltas
from moe_serve.models.tokenizer import TextTokenizer
from moe_serve.protos import moe_serving_pb2 as pb


def token_logprob(
    tokenizer: TextTokenizer, token_id: int, entry: TokenLogprobs | None
) -> pb.TokenLogprob:
    decode = lambda t: tokenizer.decode([t], skip_special_tokens=False)  # noqa: E731
    top = [
        pb.TopLogprob(token_id=t, token=decode(t), logprob=lp)
        for t, lp in (entry.top if entry else ())
    ]
    return pb.TokenLogprob(
        token_id=token_id,
        token=decode(token_id),
        logprob=entry.logprob if entry else math.nan,
        top=top,
    )


def tool_call(call: ToolCallDelta) -> pb.ToolCall:
    return pb.ToolCall(
        index=call.index, id=call.id or "", name=call.name or "", arguments=call.arguments
    )


def choice(tokenizer: TextTokenizer, delta: ChoiceDelta, want_logprobs: bool) -> pb.Choice:
    """A choice, whole or its news in a stream message: the echoed prompt first (with its
    logprobs when `want_logprobs`), then its text once tool calls were read out of it."""
    logprobs, text, echo = [], delta.text, delta.echo
    if echo is not None:
        text = tokenizer.decode(echo.prompt_ids, skip_special_tokens=False) + text
        if want_logprobs:
            entries = echo.prompt_logprobs or (None,) * len(echo.prompt_ids)
            logprobs = [
                token_logprob(tokenizer, t, e)
                for t, e in zip(echo.prompt_ids, entries, strict=True)
            ]
    logprobs += [token_logprob(tokenizer, e.token_id, e) for e in delta.logprobs]
    return pb.Choice(
        index=delta.index,
        text=text,
        token_ids=delta.token_ids,
        logprobs=logprobs,
        finish_reason=delta.finish_reason or "",
        tool_calls=[tool_call(call) for call in delta.tool_calls],
    )


def unary_choice(
    tokenizer: TextTokenizer,
    index: int,
    state: ChoiceState,
    echo: PromptRun | None,
    want_logprobs: bool,
    plan: ToolPlan,
) -> pb.Choice:
    """A whole choice, its tool calls read out of its whole text."""
    reader = ToolCallReader(plan)
    text, deltas = reader.feed(state.text, is_final=True)
    whole = ChoiceDelta(
        index,
        text,
        tuple(state.token_ids),
        tuple(state.logprobs),
        reader.finish_reason(state.finish_reason),
        tuple(merge_deltas(deltas)),
        echo,
    )
    return choice(tokenizer, whole, want_logprobs)


def usage(usage: StreamUsage) -> pb.Usage:
    num_prompt, num_completion = usage.num_prompt_tokens, usage.num_completion_tokens
    return pb.Usage(
        prompt_tokens=num_prompt,
        completion_tokens=num_completion,
        total_tokens=num_prompt + num_completion,
        cached_tokens=usage.num_cached_tokens,
    )


def stream_response(
    request_id: str,
    model: str,
    tokenizer: TextTokenizer,
    event: StreamStep | StreamUsage,
    want_logprobs: bool,
) -> pb.GenerateStreamResponse:
    """One message of GenerateStream: an output's choices, or (last) the usage."""
    if isinstance(event, StreamUsage):
        return pb.GenerateStreamResponse(id=request_id, model=model, usage=usage(event))
    choices = [choice(tokenizer, delta, want_logprobs) for delta in event.choices]
    return pb.GenerateStreamResponse(id=request_id, model=model, choices=choices)


def model_info(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=info.name,
        architecture=info.architecture,
        max_model_len=info.max_model_len,
        expert_parallel_size=info.expert_parallel_size,
        num_experts=info.num_experts,
    )
