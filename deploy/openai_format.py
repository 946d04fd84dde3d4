"""OpenAI response bodies: completions, chat completions, their stream chunks and logprobs."""

from __future__ import annotations

import json
from typing import Any

from moe_serve.cluster.sampler import TokenLogprobs
from moe_serve.deploy.gateway_core import ChoiceState, PromptRun
from moe_serve.deploy.structured import ToolPlan
from moe_serve.deploy.tool_calls import ToolCallReader, merge_calls
from moe_serve.models.tokenizer import TextTokenizer


def usage(num_prompt: int, num_completion: int, num_cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": num_prompt,
        "completion_tokens": num_completion,
        "total_tokens": num_prompt + num_completion,
        "prompt_tokens_details": {"cached_tokens": num_cached},
    }


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class CompletionLogprobs:
    """The legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs,
    text_offset (offsets count from the start of the choice's text)."""

    def __init__(self, tokenizer: TextTokenizer, offset: int = 0) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []
        self.offset = offset

    def add(self, token_id: int, entry: TokenLogprobs | None) -> None:
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        self.tokens.append(text)
        self.text_offset.append(self.offset)
        self.offset += len(text)
        self.token_logprobs.append(entry.logprob if entry else None)
        self.top_logprobs.append(
            {self.tokenizer.decode([t], skip_special_tokens=False): lp for t, lp in entry.top}
            if entry
            else None
        )

    def body(self) -> dict[str, list]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


def completion_logprobs(
    tokenizer: TextTokenizer,
    run: PromptRun | None,
    logprobs: list[TokenLogprobs],
    offset: int = 0,
) -> dict[str, list]:
    """Logprobs of (the echoed prompt, when `run` is given, then) the generated tokens;
    `offset`: where they start in the choice's text (a stream's earlier chunks)."""
    out = CompletionLogprobs(tokenizer, offset)
    if run is not None:
        entries = run.prompt_logprobs or (None,) * len(run.prompt_ids)
        for token_id, entry in zip(run.prompt_ids, entries, strict=True):
            out.add(token_id, entry)
    for entry in logprobs:
        out.add(entry.token_id, entry)
    return out.body()


def chat_logprobs(tokenizer: TextTokenizer, logprobs: list[TokenLogprobs]) -> dict[str, list]:
    def item(token_id: int, logprob: float) -> dict:
        token = tokenizer.decode([token_id], skip_special_tokens=False)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [
            item(e.token_id, e.logprob) | {"top_logprobs": [item(t, lp) for t, lp in e.top]}
            for e in logprobs
        ]
    }


def completion_body(
    request_id: str,
    created: int,
    model: str,
    runs: list[PromptRun],
    choices: list[ChoiceState],
    n: int,
    echo: bool,
    want_logprobs: bool,
    tokenizer: TextTokenizer,
) -> dict:
    body_choices = []
    for index, state in enumerate(choices):
        run = runs[index // n]
        prefix = tokenizer.decode(run.prompt_ids, skip_special_tokens=False) if echo else ""
        body_choices.append(
            {
                "index": index,
                "text": prefix + state.text,
                "logprobs": completion_logprobs(tokenizer, run if echo else None, state.logprobs)
                if want_logprobs
                else None,
                "finish_reason": state.finish_reason,
            }
        )
    num_prompt = sum(len(r.prompt_ids) for r in runs)
    num_completion = sum(len(c.token_ids) for c in choices)
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": body_choices,
        "usage": usage(num_prompt, num_completion, sum(r.num_cached_tokens for r in runs)),
    }


def chat_choice(
    index: int, state: ChoiceState, plan: ToolPlan, logprobs: dict | None
) -> dict[str, Any]:
    """One choice of a chat completion: its text as content, or as tool calls."""
    reader = ToolCallReader(plan)
    content, deltas = reader.feed(state.text, is_final=True)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if plan.mode != "text":
        message |= {"content": content or None, "tool_calls": merge_calls(deltas)}
    return {
        "index": index,
        "message": message,
        "logprobs": logprobs,
        "finish_reason": reader.finish_reason(state.finish_reason),
    }


def chat_body(
    request_id: str,
    created: int,
    model: str,
    run: PromptRun,
    choices: list[ChoiceState],
    want_logprobs: bool,
    tokenizer: TextTokenizer,
    plan: ToolPlan,
) -> dict:
    body_choices = [
        chat_choice(
            index, state, plan, chat_logprobs(tokenizer, state.logprobs) if want_logprobs else None
        )
        for index, state in enumerate(choices)
    ]
    num_completion = sum(len(c.token_ids) for c in choices)
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": body_choices,
        "usage": usage(len(run.prompt_ids), num_completion, run.num_cached_tokens),
    }


def models_body(infos) -> dict:
    return {
        "object": "list",
        "data": [
            {
                "id": info.name,
                "object": "model",
                "created": 0,
                "owned_by": "moe-serve",
                "max_model_len": info.max_model_len,
                "architecture": info.architecture,
                "expert_parallel_size": info.expert_parallel_size,
            }
            for info in infos
        ],
    }
