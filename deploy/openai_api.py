"""Handling of /v1/completions and /v1/chat/completions: validation up front (so errors are
plain 4xx responses), then either one JSON body or an SSE stream ending in `data: [DONE]`."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from moe_serve.cluster.outputs import RequestOutput
from moe_serve.cluster.params import RequestError, SamplingParams
from moe_serve.deploy.access_log import AccessRecord
from moe_serve.deploy.errors import as_api_error
from moe_serve.deploy.gateway_core import GatewayCore, ModelEndpoint, PromptRun, now, request_id
from moe_serve.deploy.metrics import RequestTracker
from moe_serve.deploy.openai_format import (
    SSE_DONE,
    chat_body,
    chat_logprobs,
    completion_body,
    completion_logprobs,
    sse,
    usage,
)
from moe_serve.deploy.openai_protocol import ChatCompletionRequest, CompletionRequest
from moe_serve.deploy.structured import ToolPlan, chat_grammar, plan_tools, response_grammar
from moe_serve.deploy.tool_calls import ToolCallReader, delta_body


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
    rid, created = request_id("cmpl"), now()
    if body.stream:
        tracker = core.metrics.track(body.model, prompts, access)
        outputs = await core.started(endpoint, prompts, params)
        chunks = _completion_chunks(outputs, tracker, endpoint, body, params, prompts, rid, created)
        return StreamingResponse(chunks, media_type="text/event-stream")
    runs, choices = await core.collect(endpoint, prompts, params, access)
    return JSONResponse(
        completion_body(
            rid,
            created,
            body.model,
            runs,
            choices,
            params.n,
            body.echo,
            body.logprobs is not None,
            endpoint.tokenizer,
        )
    )


async def _completion_chunks(
    outputs: AsyncIterator[tuple[int, RequestOutput]],
    tracker: RequestTracker,
    endpoint: ModelEndpoint,
    body: CompletionRequest,
    params: SamplingParams,
    prompts: list[list[int]],
    rid: str,
    created: int,
) -> AsyncIterator[str]:
    tokenizer, n = endpoint.tokenizer, params.n
    echoed: set[int] = set()
    offsets: dict[int, int] = {}  # choice -> text_offset of its next logprobs token
    num_completion = 0

    def chunk(index: int, text: str, logprobs, finish: str | None) -> str:
        return sse(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "choices": [
                    {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
                ],
            }
        )

    try:
        async for prompt_index, output in outputs:
            tracker.on_output(prompt_index, output)
            for delta in output.deltas:
                index = prompt_index * n + delta.index
                num_completion += len(delta.token_ids)
                text, run = delta.text, None
                if body.echo and index not in echoed:
                    echoed.add(index)
                    prompt_text = tokenizer.decode(prompts[prompt_index], skip_special_tokens=False)
                    text = prompt_text + text
                    run = PromptRun(prompts[prompt_index], output.prompt_logprobs)
                logprobs = None
                if body.logprobs is not None:
                    start = offsets.get(index, 0)
                    logprobs = completion_logprobs(tokenizer, run, list(delta.logprobs), start)
                    offsets[index] = start + sum(map(len, logprobs["tokens"]))
                if text or logprobs or delta.finish_reason:  # NOTE: else a partial character
                    yield chunk(index, text, logprobs, delta.finish_reason)
        tracker.done()
        if body.include_usage:
            yield sse(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": body.model,
                    "choices": [],
                    "usage": usage(
                        sum(map(len, prompts)), num_completion, tracker.num_cached_tokens
                    ),
                }
            )
    except Exception as exc:  # NOTE: headers are sent: report in-band
        error = as_api_error(exc)
        tracker.fail(error.status)
        yield sse(error.body())
    finally:
        await outputs.aclose()
    yield SSE_DONE


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
    rid, created = request_id("chatcmpl"), now()
    if body.stream:
        tracker = core.metrics.track(body.model, [prompt], access)
        outputs = await core.started(endpoint, [prompt], params)
        chunks = _chat_chunks(outputs, tracker, endpoint, body, plan, prompt, rid, created)
        return StreamingResponse(chunks, media_type="text/event-stream")
    runs, choices = await core.collect(endpoint, [prompt], params, access)
    tokenizer = endpoint.tokenizer
    return JSONResponse(
        chat_body(rid, created, body.model, runs[0], choices, body.logprobs, tokenizer, plan)
    )


async def _chat_chunks(
    outputs: AsyncIterator[tuple[int, RequestOutput]],
    tracker: RequestTracker,
    endpoint: ModelEndpoint,
    body: ChatCompletionRequest,
    plan: ToolPlan,
    prompt: list[int],
    rid: str,
    created: int,
) -> AsyncIterator[str]:
    readers = [ToolCallReader(plan) for _ in range(body.n)]

    def chunk(choices: list[dict], extra: dict | None = None) -> str:
        return sse(
            {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.model,
                "choices": choices,
            }
            | (extra or {})
        )

    num_completion = 0
    try:
        yield chunk(
            [
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                for i in range(body.n)
            ]
        )
        async for _, output in outputs:
            tracker.on_output(0, output)
            for delta in output.deltas:
                num_completion += len(delta.token_ids)
                logprobs = (
                    chat_logprobs(endpoint.tokenizer, list(delta.logprobs))
                    if body.logprobs
                    else None
                )
                reader = readers[delta.index]
                text, calls = reader.feed(delta.text, delta.finish_reason is not None)
                if not (text or calls or logprobs or delta.finish_reason):
                    continue  # NOTE: a partial character, or text held back: nothing yet
                content = {"content": text} if text else {}
                if calls:
                    content["tool_calls"] = [delta_body(call) for call in calls]
                yield chunk(
                    [
                        {
                            "index": delta.index,
                            "delta": content,
                            "logprobs": logprobs,
                            "finish_reason": reader.finish_reason(delta.finish_reason),
                        }
                    ]
                )
        tracker.done()
        if body.include_usage:
            cached = tracker.num_cached_tokens
            yield chunk([], {"usage": usage(len(prompt), num_completion, cached)})
    except Exception as exc:  # NOTE: headers are sent: report in-band
        error = as_api_error(exc)
        tracker.fail(error.status)
        yield sse(error.body())
    finally:
        await outputs.aclose()
    yield SSE_DONE


__all__ = ["chat_completions", "completions"]
