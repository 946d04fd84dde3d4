"""A gRPC GenerateRequest read: its sampling parameters, and its chat, response_format and tool
fields through the OpenAI request models (deploy/openai_protocol.py), so that both APIs accept
and refuse the same things."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from moe_serve.cluster.params import RequestError, SamplingParams, StructuredOutput
from moe_serve.deploy.openai_protocol import ChatMessage, NamedToolChoice, ResponseFormat, Tool
from moe_serve.deploy.structured import ToolPlan, chat_grammar, plan_tools, response_grammar
from moe_serve.protos import moe_serving_pb2 as pb

Checks = tuple[tuple[str, StructuredOutput], ...]
TOOLS = TypeAdapter(list[Tool])
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


def sampling_params(request: pb.GenerateRequest, is_chat: bool) -> SamplingParams:
    def get(name: str, default=None):
        return getattr(request, name) if request.HasField(name) else default

    values = {name: getattr(request, name) for name in _OPTIONAL if request.HasField(name)}
    logprobs = get("logprobs")
    try:
        return SamplingParams(
            max_tokens=get("max_tokens", None if is_chat else SamplingParams.max_tokens),
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


def _validated(adapter: TypeAdapter | type[BaseModel], data: Any, where: str):
    try:
        if isinstance(adapter, TypeAdapter):
            return adapter.validate_python(data)
        return adapter.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        path = ".".join(str(p) for p in (where, *first["loc"]) if p != "")
        raise RequestError(f"{path}: {first['msg']}") from None


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(f"{where} is not valid JSON: {exc}") from None


def messages(request: pb.GenerateRequest) -> list[dict[str, Any]]:
    """The chat messages as the chat template takes them."""
    out = []
    for i, message in enumerate(request.chat.messages):
        data: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.tool_call_id:
            data["tool_call_id"] = message.tool_call_id
        if message.tool_calls:
            data["tool_calls"] = [
                {"id": c.id, "function": {"name": c.name, "arguments": c.arguments}}
                for c in message.tool_calls
            ]
        out.append(_validated(ChatMessage, data, f"chat.messages[{i}]").as_template_input())
    if not out:
        raise RequestError("chat needs at least one message")
    return out


def response_format(request: pb.GenerateRequest) -> ResponseFormat | None:
    kind = request.response_format
    if request.json_schema and kind != "json_schema":
        raise RequestError('json_schema is set: response_format must be "json_schema"')
    if not kind:
        return None
    data: dict[str, Any] = {"type": kind}
    if kind == "json_schema":
        if not request.json_schema:
            raise RequestError('response_format "json_schema" needs json_schema')
        data["json_schema"] = {"name": "grpc", "schema": _json(request.json_schema, "json_schema")}
    return _validated(ResponseFormat, data, "response_format")


def tools(request: pb.GenerateRequest) -> tuple[list[Tool] | None, str | NamedToolChoice | None]:
    """The tools and tool_choice (None where unset)."""
    listed = _validated(TOOLS, _json(request.tools, "tools"), "tools") if request.tools else None
    choice = request.tool_choice or None
    if choice not in (None, "none", "auto", "required"):
        choice = NamedToolChoice(type="function", function={"name": choice})
    return listed, choice


@dataclass(frozen=True)
class Structure:
    """What a request's structured-output and tool fields ask for."""

    plan: ToolPlan
    grammar: StructuredOutput | None
    checks: Checks  # grammars to compile before queuing
    template_tools: list[dict[str, Any]] | None  # the tools, for the chat template


def structure(request: pb.GenerateRequest, is_chat: bool, architecture: str) -> Structure:
    listed, choice = tools(request)
    if not is_chat and (listed is not None or choice is not None):
        raise RequestError("tools and tool_choice apply to chat, not to prompts")
    fmt = response_format(request)
    if not is_chat:
        grammar = response_grammar(fmt)
        return Structure(
            ToolPlan(), grammar, (("response_format", grammar),) if grammar else (), None
        )
    parallel = not request.HasField("parallel_tool_calls") or request.parallel_tool_calls
    plan = plan_tools(listed, choice, parallel, architecture)
    dumped = [tool.model_dump(exclude_none=True) for tool in listed] if listed else None
    return Structure(plan, *chat_grammar(plan, fmt), dumped)
