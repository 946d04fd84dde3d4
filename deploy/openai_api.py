"""Handling of /v1/completions and /v1/chat/completions: validation up front (so errors are
plain 4xx responses), then either one JSON body or an SSE stream ending in `data: [DONE]`."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from moe_serve.cluster.params import RequestError
from moe_serve.deploy.access_log import AccessRecord
from moe_serve.deploy.choice_stream import StreamEvent, StreamStep, StreamUsage
from moe_serve.deploy.gateway_core import GatewayCore, now, request_id
from moe_serve.deploy.openai_format import (
    SSE_DONE,
    ChatChunks,
    CompletionChunks,
    Envelope,
    chat_body,
    completion_body,
    sse,
)
from moe_serve.deploy.openai_protocol import ChatCompletionRequest, CompletionRequest
from moe_serve.deploy.structured import chat_grammar, plan_tools, response_grammar


async def _prepare_completion(core: GatewayCore, body: CompletionRequest):
    if body.tools is not None or body.tool_choice is not None:
        raise RequestError("tools and tool_choice apply to /v1/chat/completions, not completions")
    endpoint = core.endpoint(body.model)
    grammar = response_grammar(body.response_format)
    params = dataclasses.replace(body.to_params(), structured=grammar)
    prompts = [core.prompt_ids(endpoint, p) for p in body.prompts()]
    core.check(endpoint, prompts, params)
    await core.check_grammars(endpoint, (("response_format", grammar),) if grammar else ())
    return endpoint, params, prompts


async def completions(core: GatewayCore, body: CompletionRequest, access: AccessRecord):
    endpoint, params, prompts = await _prepare_completion(core, body)
    envelope = Envelope(request_id("cmpl"), now(), body.model)
    want_logprobs, tokenizer = body.logprobs is not None, endpoint.tokenizer
    if body.stream:
        events = await core.stream(endpoint, prompts, params, access, is_echo=body.echo)
        chunks = CompletionChunks(envelope, tokenizer, want_logprobs)
        return _sse_response(events, chunks, body.include_usage)
    result = await core.collect(endpoint, prompts, params, access)
    return JSONResponse(
        completion_body(envelope, result, params.n, body.echo, want_logprobs, tokenizer)
    )


async def _prepare_chat(core: GatewayCore, body: ChatCompletionRequest):
    endpoint = core.endpoint(body.model)
    plan = plan_tools(
        body.tools, body.tool_choice, body.parallel_tool_calls, endpoint.info.architecture
    )
    grammar, checks = chat_grammar(plan, body.response_format)
    params = dataclasses.replace(body.to_params(), structured=grammar)
    messages = [m.as_template_input() for m in body.messages]
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
    prompt = endpoint.tokenizer.encode_chat(messages, body.add_generation_prompt, tools)
    core.check(endpoint, [prompt], params)
    await core.check_grammars(endpoint, checks)
    return endpoint, params, prompt, plan


async def chat_completions(core: GatewayCore, body: ChatCompletionRequest, access: AccessRecord):
    endpoint, params, prompt, plan = await _prepare_chat(core, body)
    envelope = Envelope(request_id("chatcmpl"), now(), body.model)
    if body.stream:
        events = await core.stream(endpoint, [prompt], params, access, plan=plan)
        chunks = ChatChunks(envelope, endpoint.tokenizer, body.logprobs, params.n)
        return _sse_response(events, chunks, body.include_usage)
    result = await core.collect(endpoint, [prompt], params, access)
    return JSONResponse(chat_body(envelope, result, body.logprobs, endpoint.tokenizer, plan))


def _sse_response(
    events: AsyncIterator[StreamEvent], chunks: CompletionChunks | ChatChunks, include_usage: bool
) -> StreamingResponse:
    return StreamingResponse(_sse(events, chunks, include_usage), media_type="text/event-stream")


async def _sse(
    events: AsyncIterator[StreamEvent], chunks: CompletionChunks | ChatChunks, include_usage: bool
) -> AsyncIterator[str]:
    # NOTE: a client gone closes this, which closes `events`: the replicas drop the request
    async with contextlib.aclosing(events):
        for chunk in chunks.head():
            yield sse(chunk)
        async for event in events:
            if isinstance(event, StreamStep):
                for chunk in chunks.step(event):
                    yield sse(chunk)
            elif isinstance(event, StreamUsage):
                if include_usage:
                    yield sse(chunks.usage(event))
            else:  # NOTE: the headers are sent: the error goes in-band
                yield sse(event.error.body())
    yield SSE_DONE


__all__ = ["chat_completions", "completions"]
