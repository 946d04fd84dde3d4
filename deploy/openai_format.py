"""OpenAI response bodies: completions and chat completions, whole or as stream chunks (SSE),
their logprobs, usage and tool calls; the model list."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from moe_serve.cluster.sampler import TokenLogprobs
from moe_serve.deploy.choice_stream import (
    ChoiceDelta,
    ChoiceState,
    Collected,
    PromptRun,
    StreamStep,
    StreamUsage,
)
from moe_serve.deploy.structured import ToolPlan
from moe_serve.deploy.tool_calls import ToolCallDelta, ToolCallReader, merge_deltas
from moe_serve.models.tokenizer import TextTokenizer

SSE_DONE = "data: [DONE]\n\n"


# NOTE: JSON leaves U+0085, U+2028 and U+2029 raw, and line readers that follow str.splitlines
# (httpx's iter_lines among them) end a line there, cutting an event in two. Escaped, the event
# decodes to the same text; every other character below U+0020 JSON escapes itself.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False).translate(_LINE_BREAKS)}\n\n"


@dataclass(frozen=True)
class Envelope:
    """What every body and chunk of one response carries."""

    id: str
    created: int
    model: str

    def body(self, kind: str, choices: list[dict], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        } | extra


def usage_body(usage: StreamUsage) -> dict[str, Any]:
    num_prompt, num_completion = usage.num_prompt_tokens, usage.num_completion_tokens
    return {
        "prompt_tokens": num_prompt,
        "completion_tokens": num_completion,
        "total_tokens": num_prompt + num_completion,
        "prompt_tokens_details": {"cached_tokens": usage.num_cached_tokens},
    }


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
    echo: PromptRun | None,
    logprobs: tuple[TokenLogprobs, ...] | list[TokenLogprobs],
    offset: int = 0,
) -> dict[str, list]:
    """Logprobs of (the echoed prompt, when `echo` is given, then) the generated tokens;
    `offset`: where they start in the choice's text (a stream's earlier chunks)."""
    out = CompletionLogprobs(tokenizer, offset)
    if echo is not None:
        entries = echo.prompt_logprobs or (None,) * len(echo.prompt_ids)
        for token_id, entry in zip(echo.prompt_ids, entries, strict=True):
            out.add(token_id, entry)
    for entry in logprobs:
        out.add(entry.token_id, entry)
    return out.body()


def completion_choice(
    tokenizer: TextTokenizer,
    index: int,
    choice: ChoiceState | ChoiceDelta,
    echo: PromptRun | None,
    want_logprobs: bool,
    offset: int = 0,
) -> dict[str, Any]:
    """One choice of a completion (whole, or its news in a stream chunk); `echo`: the prompt
    to put first; `offset`: the text_offset of its first logprobs token."""
    prefix = tokenizer.decode(echo.prompt_ids, skip_special_tokens=False) if echo else ""
    logprobs = (
        completion_logprobs(tokenizer, echo, choice.logprobs, offset) if want_logprobs else None
    )
    return {
        "index": index,
        "text": prefix + choice.text,
        "logprobs": logprobs,
        "finish_reason": choice.finish_reason,
    }


def completion_body(
    envelope: Envelope,
    result: Collected,
    n: int,
    is_echo: bool,
    want_logprobs: bool,
    tokenizer: TextTokenizer,
) -> dict:
    choices = [
        completion_choice(
            tokenizer, index, state, result.runs[index // n] if is_echo else None, want_logprobs
        )
        for index, state in enumerate(result.choices)
    ]
    return envelope.body("text_completion", choices, usage=usage_body(result.usage))


@dataclass
class CompletionChunks:
    """The SSE chunks of a streamed completion: one per choice delta with news."""

    envelope: Envelope
    tokenizer: TextTokenizer
    want_logprobs: bool
    # choice -> the text_offset of its next logprobs token
    offsets: dict[int, int] = field(default_factory=dict)

    def head(self) -> list[dict]:
        return []

    def step(self, step: StreamStep) -> list[dict]:
        chunks = []
        for delta in step.choices:
            start = self.offsets.get(delta.index, 0)
            choice = completion_choice(
                self.tokenizer, delta.index, delta, delta.echo, self.want_logprobs, start
            )
            if choice["logprobs"] is not None:
                self.offsets[delta.index] = start + sum(map(len, choice["logprobs"]["tokens"]))
            if choice["text"] or choice["logprobs"] or choice["finish_reason"]:
                chunks.append(self.envelope.body("text_completion", [choice]))
            # NOTE: else a partial character: nothing yet
        return chunks

    def usage(self, usage: StreamUsage) -> dict:
        return self.envelope.body("text_completion", [], usage=usage_body(usage))


def chat_logprobs(
    tokenizer: TextTokenizer, logprobs: tuple[TokenLogprobs, ...] | list[TokenLogprobs]
) -> dict[str, list]:
    def item(token_id: int, logprob: float) -> dict:
        token = tokenizer.decode([token_id], skip_special_tokens=False)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [
            item(e.token_id, e.logprob) | {"top_logprobs": [item(t, lp) for t, lp in e.top]}
            for e in logprobs
        ]
    }


def tool_call_body(call: ToolCallDelta) -> dict:
    """OpenAI's message.tool_calls[i] of a whole call."""
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def tool_call_delta_body(delta: ToolCallDelta) -> dict:
    """OpenAI's stream chunk entry delta.tool_calls[i]."""
    function = {"arguments": delta.arguments} | ({"name": delta.name} if delta.name else {})
    head = {"id": delta.id, "type": "function"} if delta.id is not None else {}
    return {"index": delta.index} | head | {"function": function}


def chat_choice(
    index: int, state: ChoiceState, plan: ToolPlan, logprobs: dict | None
) -> dict[str, Any]:
    """One choice of a chat completion: its text as content, or as tool calls."""
    reader = ToolCallReader(plan)
    content, deltas = reader.feed(state.text, is_final=True)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if plan.mode != "text":
        calls = [tool_call_body(call) for call in merge_deltas(deltas)]
        message |= {"content": content or None, "tool_calls": calls}
    return {
        "index": index,
        "message": message,
        "logprobs": logprobs,
        "finish_reason": reader.finish_reason(state.finish_reason),
    }


def chat_body(
    envelope: Envelope,
    result: Collected,
    want_logprobs: bool,
    tokenizer: TextTokenizer,
    plan: ToolPlan,
) -> dict:
    choices = [
        chat_choice(
            index, state, plan, chat_logprobs(tokenizer, state.logprobs) if want_logprobs else None
        )
        for index, state in enumerate(result.choices)
    ]
    return envelope.body("chat.completion", choices, usage=usage_body(result.usage))


@dataclass(frozen=True)
class ChatChunks:
    """The SSE chunks of a streamed chat completion: each choice's role first, then one per
    choice delta with news (content or tool calls)."""

    envelope: Envelope
    tokenizer: TextTokenizer
    want_logprobs: bool
    n: int

    def head(self) -> list[dict]:
        role = {"role": "assistant", "content": ""}
        choices = [
            {"index": i, "delta": role, "logprobs": None, "finish_reason": None}
            for i in range(self.n)
        ]
        return [self.envelope.body("chat.completion.chunk", choices)]

    def step(self, step: StreamStep) -> list[dict]:
        chunks = []
        for delta in step.choices:
            logprobs = chat_logprobs(self.tokenizer, delta.logprobs) if self.want_logprobs else None
            if not (delta.text or delta.tool_calls or logprobs or delta.finish_reason):
                continue  # NOTE: a partial character, or text held back: nothing yet
            content: dict[str, Any] = {"content": delta.text} if delta.text else {}
            if delta.tool_calls:
                content["tool_calls"] = [tool_call_delta_body(c) for c in delta.tool_calls]
            choice = {
                "index": delta.index,
                "delta": content,
                "logprobs": logprobs,
                "finish_reason": delta.finish_reason,
            }
            chunks.append(self.envelope.body("chat.completion.chunk", [choice]))
        return chunks

    def usage(self, usage: StreamUsage) -> dict:
        return self.envelope.body("chat.completion.chunk", [], usage=usage_body(usage))


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
