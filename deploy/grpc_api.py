"""The gRPC API (`moeserving.v1.MoEServing`): protobuf in and out at this edge only."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import AsyncIterator

from moe_serve.cluster.params import RequestError, SamplingParams
from moe_serve.cluster.sampler import TokenLogprobs
from moe_serve.deploy import grpc_protocol
from moe_serve.deploy.access_log import AccessRecord
from moe_serve.deploy.errors import ApiError, as_api_error
from moe_serve.deploy.gateway_core import (
    ChoiceState,
    GatewayCore,
    ModelEndpoint,
    PromptRun,
    request_id,
)
from moe_serve.deploy.structured import ToolPlan
from moe_serve.deploy.tool_calls import ToolCallDelta, ToolCallReader, merge_calls
from moe_serve.models.tokenizer import TextTokenizer
from moe_serve.protos import moe_serving_pb2 as pb

_OPTIONAL = (  # NOTE: optional proto fields: unset ones keep SamplingParams' defaults
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


def authorize(core: GatewayCore, context) -> None:
    metadata = dict(context.invocation_metadata() or ())
    core.authorize(metadata.get("authorization"))


def _params(request: pb.GenerateRequest, is_chat: bool) -> SamplingParams:
    def get(name: str, default=None):
        return getattr(request, name) if request.HasField(name) else default

    values = {name: getattr(request, name) for name in _OPTIONAL if request.HasField(name)}
    logprobs = get("logprobs")
    try:
        return SamplingParams(
            max_tokens=get("max_tokens", None if is_chat else 16),
            seed=get("seed"),
            stop=tuple(request.stop),
            stop_token_ids=tuple(request.stop_token_ids),
            logprobs=logprobs,
            prompt_logprobs=logprobs if request.echo else None,  # NOTE: echo with chat is refused
            ignore_eos=request.ignore_eos,
            **values,
        )
    except RequestError as exc:
        raise RequestError(f"invalid sampling parameters: {exc}") from None


def _prompt(
    core: GatewayCore,
    endpoint: ModelEndpoint,
    request: pb.GenerateRequest,
    tools: list[dict] | None,
) -> list[int]:
    kind = request.WhichOneof("input")
    if kind == "prompt":
        return core.prompt_ids(endpoint, request.prompt)
    if kind == "prompt_token_ids":
        return core.prompt_ids(endpoint, list(request.prompt_token_ids.ids))
    if kind == "chat":
        return endpoint.tokenizer.encode_chat(grpc_protocol.messages(request), tools=tools)
    raise RequestError("set one of prompt, prompt_token_ids or chat")


async def _prepare(core: GatewayCore, request: pb.GenerateRequest):
    endpoint = core.endpoint(request.model)
    is_chat = request.WhichOneof("input") == "chat"
    if is_chat and request.echo:
        raise RequestError("echo applies to prompt and prompt_token_ids, not to chat")
    wanted = grpc_protocol.structure(request, is_chat, endpoint.info.architecture)
    params = dataclasses.replace(_params(request, is_chat), structured=wanted.grammar)
    prompt = _prompt(core, endpoint, request, wanted.template_tools)
    core.check(endpoint, [prompt], params)
    await core.check_grammars(endpoint, wanted.checks)
    return endpoint, params, prompt, wanted.plan


def _token_logprob(tokenizer: TextTokenizer, token_id: int, entry: TokenLogprobs | None):
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


def _tool_call(call: ToolCallDelta) -> pb.ToolCall:
    return pb.ToolCall(
        index=call.index, id=call.id or "", name=call.name or "", arguments=call.arguments
    )


def _choice(
    tokenizer: TextTokenizer,
    index: int,
    state: ChoiceState,
    echo: PromptRun | None,
    want_logprobs: bool,
    calls: list[ToolCallDelta] = (),
) -> pb.Choice:
    """`echo`: the prompt to prepend (with its logprobs when `want_logprobs`); `state.text`
    is what is left of the text once `calls` were read out of it."""
    logprobs, text = [], state.text
    if echo is not None:
        text = tokenizer.decode(echo.prompt_ids, skip_special_tokens=False) + text
        if want_logprobs:
            entries = echo.prompt_logprobs or (None,) * len(echo.prompt_ids)
            logprobs = [
                _token_logprob(tokenizer, t, e)
                for t, e in zip(echo.prompt_ids, entries, strict=True)
            ]
    logprobs += [_token_logprob(tokenizer, e.token_id, e) for e in state.logprobs]
    return pb.Choice(
        index=index,
        text=text,
        token_ids=state.token_ids,
        logprobs=logprobs,
        finish_reason=state.finish_reason or "",
        tool_calls=[_tool_call(call) for call in calls],
    )


def _usage(num_prompt: int, num_completion: int, num_cached: int) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=num_prompt,
        completion_tokens=num_completion,
        total_tokens=num_prompt + num_completion,
        cached_tokens=num_cached,
    )


class StreamAborted(RuntimeError):
    """Ends a server stream with the status set on the context (Serve's proxy keeps a status
    set before an exception; with nothing yielded, a plain return would end with OK)."""


def _fail(core: GatewayCore, model: str, api: str, context, exc: BaseException) -> ApiError:
    error = as_api_error(exc)
    context.set_code(error.grpc_code)
    context.set_details(error.message)
    core.count(model, api, error.status)
    return error


async def generate(
    core: GatewayCore, request: pb.GenerateRequest, context, access: AccessRecord
) -> pb.GenerateResponse:
    try:
        authorize(core, context)
        endpoint, params, prompt, plan = await _prepare(core, request)
        runs, choices = await core.collect(endpoint, [prompt], params, access)
    except Exception as exc:
        _fail(core, request.model, "grpc_generate", context, exc)
        return pb.GenerateResponse()
    core.count(request.model, "grpc_generate", 200)
    echo = runs[0] if request.echo else None
    want = request.HasField("logprobs")
    num_completion = sum(len(c.token_ids) for c in choices)
    return pb.GenerateResponse(
        id=request_id("gen"),
        model=request.model,
        choices=[
            _unary_choice(endpoint.tokenizer, i, c, echo, want, plan) for i, c in enumerate(choices)
        ],
        usage=_usage(len(prompt), num_completion, runs[0].num_cached_tokens),
    )


def _unary_choice(
    tokenizer: TextTokenizer,
    index: int,
    state: ChoiceState,
    echo: PromptRun | None,
    want_logprobs: bool,
    plan: ToolPlan,
) -> pb.Choice:
    reader = ToolCallReader(plan)
    text, deltas = reader.feed(state.text, is_final=True)
    calls = [
        ToolCallDelta(i, c["function"]["arguments"], c["id"], c["function"]["name"])
        for i, c in enumerate(merge_calls(deltas))
    ]
    state = dataclasses.replace(
        state, text=text, finish_reason=reader.finish_reason(state.finish_reason)
    )
    return _choice(tokenizer, index, state, echo, want_logprobs, calls)


async def generate_stream(
    core: GatewayCore, request: pb.GenerateRequest, context, access: AccessRecord
) -> AsyncIterator[pb.GenerateStreamResponse]:
    try:
        authorize(core, context)
        endpoint, params, prompt, plan = await _prepare(core, request)
    except Exception as exc:
        error = _fail(core, request.model, "grpc_generate_stream", context, exc)
        raise StreamAborted(error.message) from None
    rid, num_completion, echoed = request_id("gen"), 0, set()
    readers = [ToolCallReader(plan) for _ in range(params.n)]
    want = request.HasField("logprobs")
    tracker = core.metrics.track(request.model, [prompt], access)
    outputs = core.stream(endpoint, [prompt], params)
    try:
        async for _, output in outputs:
            tracker.on_output(0, output)
            choices = []
            for delta in output.deltas:
                num_completion += len(delta.token_ids)
                reader = readers[delta.index]
                text, calls = reader.feed(delta.text, delta.finish_reason is not None)
                finish = reader.finish_reason(delta.finish_reason)
                state = ChoiceState(text, list(delta.token_ids), list(delta.logprobs), finish)
                echo = None
                if request.echo and delta.index not in echoed:
                    echoed.add(delta.index)
                    echo = PromptRun(prompt, output.prompt_logprobs)
                choices.append(_choice(endpoint.tokenizer, delta.index, state, echo, want, calls))
            yield pb.GenerateStreamResponse(id=rid, model=request.model, choices=choices)
        tracker.done()
        yield pb.GenerateStreamResponse(
            id=rid,
            model=request.model,
            usage=_usage(len(prompt), num_completion, tracker.num_cached_tokens),
        )
        core.count(request.model, "grpc_generate_stream", 200)
    except Exception as exc:
        error = _fail(core, request.model, "grpc_generate_stream", context, exc)
        raise StreamAborted(error.message) from None
    finally:
        await outputs.aclose()


def list_models(core: GatewayCore, context) -> pb.ListModelsResponse:
    try:
        authorize(core, context)
    except ApiError as exc:
        _fail(core, "-", "grpc_list_models", context, exc)
        return pb.ListModelsResponse()
    return pb.ListModelsResponse(
        models=[
            pb.ModelInfo(
                name=e.info.name,
                architecture=e.info.architecture,
                max_model_len=e.info.max_model_len,
                expert_parallel_size=e.info.expert_parallel_size,
                num_experts=e.info.num_experts,
            )
            for e in core.endpoints.values()
        ]
    )
