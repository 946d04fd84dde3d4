"""`response_format` and `tools` / `tool_choice` -> the grammar a request's completions match.

json_object and json_schema constrain the whole output. tool_choice "required" constrains it to
a JSON array of calls, `[{"name": ..., "arguments": {...}}, ...]` (exactly one call without
parallel_tool_calls), each call's arguments validating against its function's parameters; a
named function constrains it to that function's arguments object. "auto" leaves the output
free and reads the model's own tool-call format where its architecture has one.
Shared by the HTTP and gRPC APIs; the grammars are compiled (checked) before queuing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from moe_serve.cluster.grammar import GrammarCompiler
from moe_serve.cluster.params import RequestError, StructuredOutput
from moe_serve.deploy.openai_protocol import NamedToolChoice, ResponseFormat, Tool

# architecture -> the tool-call format its instruct models emit, read under tool_choice "auto"
TOOL_CALL_FORMATS = {"GraniteMoeForCausalLM": "granite"}
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


def _json_grammar(schema: dict[str, Any]) -> StructuredOutput:
    return StructuredOutput("json_schema", json.dumps(schema, ensure_ascii=False))


def response_grammar(response_format: ResponseFormat | None) -> StructuredOutput | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return _json_grammar({"type": "object"})
    return _json_grammar(response_format.json_schema.schema_)


def parameters_of(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters if tool.function.parameters is not None else NO_ARGUMENTS


@dataclass(frozen=True)
class ToolPlan:
    """How a chat request's output is read: as text, or as tool calls."""

    mode: str = "text"  # "text" (no tools, or "none"), "auto", "required" or "named"
    names: tuple[str, ...] = ()  # the functions the model may call
    name: str | None = None  # mode "named": the function called
    parser: str | None = None  # mode "auto": the model's tool-call format, if any
    grammar: StructuredOutput | None = None  # modes "required" and "named"
    # (where, grammar) to compile before queuing, so that a bad schema is named in the 400
    checks: tuple[tuple[str, StructuredOutput], ...] = field(default=())


def _required_schema(tools: list[Tool], parallel: bool) -> dict[str, Any]:
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool.function.name},
                "arguments": parameters_of(tool),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    schema = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    return schema | ({} if parallel else {"maxItems": 1})


def plan_tools(
    tools: list[Tool] | None,
    tool_choice: str | NamedToolChoice | None,
    parallel: bool,
    architecture: str,
) -> ToolPlan:
    """Raises RequestError for a choice the tools cannot satisfy."""
    tools = tools or []
    names = tuple(tool.function.name for tool in tools)
    if len(set(names)) < len(names):
        raise RequestError(f"tools: function names must be unique, got {list(names)}")
    choice = tool_choice or ("auto" if tools else "none")
    if choice != "none" and not tools:
        raise RequestError("tool_choice needs tools")
    if choice == "none":
        return ToolPlan()
    if choice == "auto":
        return ToolPlan("auto", names, parser=TOOL_CALL_FORMATS.get(architecture))
    checks = tuple(
        (f"tools[{i}].function.parameters", _json_grammar(parameters_of(tool)))
        for i, tool in enumerate(tools)
    )
    if choice == "required":
        grammar = _json_grammar(_required_schema(tools, parallel))
        return ToolPlan("required", names, grammar=grammar, checks=(*checks, ("tools", grammar)))
    name = choice.function.name
    if name not in names:
        raise RequestError(
            f"tool_choice names function {name!r}, which is not among tools {list(names)}"
        )
    index = names.index(name)
    return ToolPlan("named", names, name, grammar=checks[index][1], checks=(checks[index],))


def chat_grammar(
    plan: ToolPlan, response_format: ResponseFormat | None
) -> tuple[StructuredOutput | None, tuple[tuple[str, StructuredOutput], ...]]:
    """The grammar of a chat request and the (where, grammar) checks it needs."""
    response = response_grammar(response_format)
    if response is not None and plan.grammar is not None:
        raise RequestError(
            "response_format cannot be combined with tool_choice 'required' or a named function"
        )
    if response is not None:
        return response, (("response_format", response),)
    return plan.grammar, plan.checks


def check_grammars(
    compiler: GrammarCompiler, checks: tuple[tuple[str, StructuredOutput], ...]
) -> None:
    """Compile each grammar (cached); RequestError naming the first that does not compile."""
    for where, spec in checks:
        try:
            compiler.check(spec)
        except RequestError as exc:
            raise RequestError(f"{where}: {exc}") from None
