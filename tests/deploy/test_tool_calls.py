"""Tool plans and grammars from tools / tool_choice, and tool calls read out of streamed text."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from moe_serve.cluster.params import RequestError
from moe_serve.deploy.openai_protocol import NamedToolChoice, ResponseFormat, Tool
from moe_serve.deploy.structured import chat_grammar, plan_tools
from moe_serve.deploy.tool_calls import ArrayScanner, ToolCallReader, merge_deltas, parse_granite

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    Tool.model_validate(
        {"type": "function", "function": {"name": "weather", "parameters": WEATHER}}
    ),
    Tool.model_validate({"type": "function", "function": {"name": "time"}}),
]
CALLS = (
    '[{"name": "weather", "arguments": {"city": "a \\"}{[ b"}}, {"name": "time", "arguments": {}}]'
)


def named(name: str) -> NamedToolChoice:
    return NamedToolChoice.model_validate({"type": "function", "function": {"name": name}})


def pieces(text: str, seed: int) -> list[str]:
    rng, out, start = random.Random(seed), [], 0
    while start < len(text):
        size = rng.randint(0, 4)
        out.append(text[start : start + size])
        start += size
    return out


def read(reader: ToolCallReader, parts: list[str]):
    content, deltas = "", []
    for i, part in enumerate(parts):
        text, calls = reader.feed(part, is_final=i == len(parts) - 1)
        content, deltas = content + text, deltas + calls
    return content, deltas


def test_required_calls_follow_their_schema_and_stream_whole_calls():
    plan = plan_tools(TOOLS, "required", True, "OlmoeForCausalLM")
    schema = json.loads(plan.grammar.text)
    jsonschema.validate(json.loads(CALLS), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "weather", "arguments": {}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], schema)
    single = json.loads(plan_tools(TOOLS, "required", False, "x").grammar.text)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(CALLS), single)
    for seed in range(20):
        content, deltas = read(ToolCallReader(plan), pieces(CALLS, seed))
        calls = merge_deltas(deltas)
        assert content == "" and [c.name for c in calls] == ["weather", "time"]
        assert json.loads(calls[0].arguments) == {"city": 'a "}{[ b'}
        assert len({c.id for c in calls}) == 2


def test_a_named_function_streams_its_arguments():
    plan = plan_tools(TOOLS, named("weather"), True, "x")
    assert json.loads(plan.grammar.text) == WEATHER
    reader = ToolCallReader(plan)
    content, deltas = read(reader, pieces('{"city": "Paris"}', 1))
    assert content == "" and len(deltas) > 1 and deltas[0].name == "weather"
    assert all(d.id is None for d in deltas[1:]) and reader.finish_reason("stop") == "tool_calls"
    assert merge_deltas(deltas)[0].arguments == '{"city": "Paris"}'
    no_arguments = json.loads(plan_tools(TOOLS, named("time"), True, "x").grammar.text)
    jsonschema.validate({}, no_arguments)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"x": 1}, no_arguments)


def test_auto_reads_granite_calls_and_passes_text_through():
    plan = plan_tools(TOOLS, None, True, "GraniteMoeForCausalLM")
    assert plan.mode == "auto" and plan.parser == "granite" and plan.grammar is None
    granite = '<|tool_call|>[{"name": "time", "arguments": {}}]'
    for seed in range(5):
        reader = ToolCallReader(plan)
        content, deltas = read(reader, pieces(granite, seed))
        assert content == "" and merge_deltas(deltas)[0].name == "time"
        assert reader.finish_reason("stop") == "tool_calls"
    reader = ToolCallReader(plan)
    assert reader.feed("Hello", is_final=False) == ("Hello", [])  # NOTE: not held back
    assert reader.feed(" [x]", is_final=True) == (" [x]", [])
    assert reader.finish_reason("stop") == "stop"
    for text in ('[{"name": "nope", "arguments": {}}]', "<tool_call>[1", " <tool"):
        assert read(ToolCallReader(plan), pieces(text, 0)) == (text, [])
    assert parse_granite('<tool_call> {"name": "time"}', ("time",)) == [("time", {})]
    other = plan_tools(TOOLS, "auto", True, "OlmoeForCausalLM")
    assert other.parser is None and ToolCallReader(other).feed("[", False) == ("[", [])


def test_array_scanner_splits_elements_whatever_the_pieces():
    for seed in range(10):
        scanner = ArrayScanner()
        elements = [e for part in pieces(CALLS, seed) for e in scanner.feed(part)]
        assert [json.loads(e) for e in elements] == json.loads(CALLS)


@pytest.mark.parametrize(
    ("tools", "choice", "message"),
    [
        (TOOLS, named("nope"), "tool_choice names function 'nope'"),
        (None, "required", "tool_choice needs tools"),
        (TOOLS + TOOLS[:1], "auto", "names must be unique"),
    ],
)
def test_choices_the_tools_cannot_satisfy_are_refused(tools, choice, message):
    with pytest.raises(RequestError, match=message):
        plan_tools(tools, choice, True, "x")


def test_response_format_and_forced_calls_do_not_mix():
    fmt = ResponseFormat.model_validate({"type": "json_object"})
    with pytest.raises(RequestError, match="cannot be combined"):
        chat_grammar(plan_tools(TOOLS, "required", True, "x"), fmt)
    grammar, checks = chat_grammar(plan_tools(TOOLS, "auto", True, "x"), fmt)
    assert json.loads(grammar.text) == {"type": "object"} and checks[0][0] == "response_format"
    assert chat_grammar(plan_tools(None, None, True, "x"), None) == (None, ())
