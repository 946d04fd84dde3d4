"""The gRPC API (`moeserving.v1.MoEServing`): protobuf in and out at this edge only."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator

from moe_serve.cluster.params import RequestError
from moe_serve.deploy import grpc_format, grpc_protocol
from moe_serve.deploy.access_log import AccessRecord
from moe_serve.deploy.choice_stream import StreamFailed
from moe_serve.deploy.errors import ApiError, as_api_error
from moe_serve.deploy.gateway_core import GatewayCore, ModelEndpoint, request_id
from moe_serve.protos import moe_serving_pb2 as pb


def authorize(core: GatewayCore, context) -> None:
    metadata = dict(context.invocation_metadata() or ())
    core.authorize(metadata.get("authorization"))


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
    params = grpc_protocol.sampling_params(request, is_chat)
    params = dataclasses.replace(params, structured=wanted.grammar)
    prompt = _prompt(core, endpoint, request, wanted.template_tools)
    core.check(endpoint, [prompt], params)
    await core.check_grammars(endpoint, wanted.checks)
    return endpoint, params, prompt, wanted.plan


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
        result = await core.collect(endpoint, [prompt], params, access)
    except Exception as exc:
        _fail(core, request.model, "grpc_generate", context, exc)
        return pb.GenerateResponse()
    core.count(request.model, "grpc_generate", 200)
    echo = result.runs[0] if request.echo else None
    want, tokenizer = request.HasField("logprobs"), endpoint.tokenizer
    return pb.GenerateResponse(
        id=request_id("gen"),
        model=request.model,
        choices=[
            grpc_format.unary_choice(tokenizer, i, c, echo, want, plan)
            for i, c in enumerate(result.choices)
        ],
        usage=grpc_format.usage(result.usage),
    )


async def generate_stream(
    core: GatewayCore, request: pb.GenerateRequest, context, access: AccessRecord
) -> AsyncIterator[pb.GenerateStreamResponse]:
    api = "grpc_generate_stream"
    try:
        authorize(core, context)
        endpoint, params, prompt, plan = await _prepare(core, request)
        events = await core.stream(
            endpoint, [prompt], params, access, is_echo=request.echo, plan=plan
        )
    except Exception as exc:
        error = _fail(core, request.model, api, context, exc)
        raise StreamAborted(error.message) from None
    rid, want = request_id("gen"), request.HasField("logprobs")
    async with contextlib.aclosing(events):  # NOTE: a cancelled call cancels the request
        async for event in events:
            if isinstance(event, StreamFailed):
                error = _fail(core, request.model, api, context, event.error)
                raise StreamAborted(error.message) from None
            yield grpc_format.stream_response(rid, request.model, endpoint.tokenizer, event, want)
    core.count(request.model, api, 200)


def list_models(core: GatewayCore, context) -> pb.ListModelsResponse:
    try:
        authorize(core, context)
    except ApiError as exc:
        _fail(core, "-", "grpc_list_models", context, exc)
        return pb.ListModelsResponse()
    return pb.ListModelsResponse(
        models=[grpc_format.model_info(e.info) for e in core.endpoints.values()]
    )
