"""Structured outputs and tool calling through the official `openai` client and gRPC, served by
random-weight models at EP = 2: their answers parse and validate only because the grammar is
enforced (the same seeds without it do not)."""

from __future__ import annotations

import json

import grpc
import httpx
import jsonschema
import pytest
from openai import OpenAI

from moe_serve.protos import moe_serving_pb2 as pb
from moe_serve.protos import moe_serving_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
N = 8  # NOTE: completion i of a request uses seed + i: N seeds per request
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "maxItems": 2},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
}
PARAMETERS = {  # NOTE: short: the tiny tokenizer spends a token per JSON character
    "weather": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
    "time": {
        "type": "object",
        "properties": {"zone": {"enum": ["UTC", "CET"]}},
        "required": ["zone"],
        "additionalProperties": False,
    },
}
TOOLS = [
    {"type": "function", "function": {"name": n, "parameters": p}} for n, p in PARAMETERS.items()
]
ASK = [{"role": "user", "content": "Who is it?"}]
SAMPLED = dict(temperature=1.0, max_tokens=100, n=N)


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server.http}/v1", api_key=server.api_key, max_retries=0, timeout=300)


def is_valid(text: str, schema: dict = SCHEMA) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def assert_valid_calls(calls, finish_reason: str, num_calls: int | None = 1) -> None:
    assert finish_reason == "tool_calls" and calls
    assert num_calls is None or len(calls) == num_calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert is_valid(call.function.arguments, PARAMETERS[call.function.name]), call


def streamed_choices(stream) -> dict[int, dict]:
    """index -> content, tool calls (index -> id, name, arguments) and finish reason."""
    choices: dict[int, dict] = {}
    for chunk in stream:
        for choice in chunk.choices:
            state = choices.setdefault(choice.index, {"content": "", "calls": {}, "finish": None})
            state["content"] += choice.delta.content or ""
            for piece in choice.delta.tool_calls or []:
                call = state["calls"].setdefault(piece.index, {"arguments": ""})
                if piece.id is not None:
                    assert "id" not in call  # NOTE: only a call's first piece carries its id
                    call |= {"id": piece.id, "name": piece.function.name}
                call["arguments"] += piece.function.arguments or ""
            state["finish"] = choice.finish_reason or state["finish"]
    return choices


def test_chat_json_schema_validates_for_every_seed_only_with_the_grammar(client):
    args = dict(model="jetmoe", messages=ASK, seed=100, **SAMPLED)
    response = client.chat.completions.create(response_format=RESPONSE_FORMAT, **args)
    for choice in response.choices:
        assert choice.finish_reason == "stop" and is_valid(choice.message.content), choice
    streamed = streamed_choices(
        client.chat.completions.create(response_format=RESPONSE_FORMAT, stream=True, **args)
    )
    assert [streamed[i]["content"] for i in range(N)] == [
        c.message.content for c in response.choices
    ]
    free = client.chat.completions.create(**args)
    assert not any(is_valid(c.message.content) for c in free.choices)


def test_completions_json_schema_validates_streamed_and_not(client):
    args = dict(model="granite", prompt="A person:", seed=200, **SAMPLED)
    extra = {"response_format": RESPONSE_FORMAT}
    response = client.completions.create(extra_body=extra, **args)
    assert all(c.finish_reason == "stop" and is_valid(c.text) for c in response.choices)
    texts = [""] * N
    for chunk in client.completions.create(extra_body=extra, stream=True, **args):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in response.choices]
    free = client.completions.create(**args)
    assert not any(is_valid(c.text) for c in free.choices)


def test_json_object_answers_are_json_objects(client):
    response = client.chat.completions.create(
        model="jetmoe", messages=ASK, seed=300, response_format={"type": "json_object"}, **SAMPLED
    )
    finished = [c for c in response.choices if c.finish_reason == "stop"]
    assert finished  # NOTE: the others ran out of tokens inside a long random key
    assert all(isinstance(json.loads(c.message.content), dict) for c in finished)
    assert all(c.message.content.startswith("{") for c in response.choices)


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_choice_returns_valid_calls(client, stream):
    args = dict(
        model="granite", messages=ASK, seed=400, tools=TOOLS, tool_choice="required", **SAMPLED
    )
    response = client.chat.completions.create(parallel_tool_calls=False, **args)
    for choice in response.choices:
        assert choice.message.content is None
        assert_valid_calls(choice.message.tool_calls, choice.finish_reason)
    if stream:
        streamed = streamed_choices(
            client.chat.completions.create(parallel_tool_calls=False, stream=True, **args)
        )
        for i, choice in enumerate(response.choices):
            call = choice.message.tool_calls[0].function
            assert streamed[i]["finish"] == "tool_calls" and streamed[i]["content"] == ""
            assert [(c["name"], c["arguments"]) for c in streamed[i]["calls"].values()] == [
                (call.name, call.arguments)
            ]
    parallel = client.chat.completions.create(**args | {"max_tokens": 120, "n": 4})
    for choice in parallel.choices:
        if choice.finish_reason == "tool_calls":
            assert_valid_calls(choice.message.tool_calls, choice.finish_reason, None)
    assert any(len(c.message.tool_calls) > 1 for c in parallel.choices)


def test_a_named_function_is_called_for_every_seed_streamed_or_not(client):
    choice = {"type": "function", "function": {"name": "weather"}}
    args = dict(model="jetmoe", messages=ASK, seed=500, tools=TOOLS, tool_choice=choice, **SAMPLED)
    response = client.chat.completions.create(**args)
    for c in response.choices:
        assert_valid_calls(c.message.tool_calls, c.finish_reason)
        assert c.message.tool_calls[0].function.name == "weather"
    streamed = streamed_choices(client.chat.completions.create(stream=True, **args))
    for i, c in enumerate(response.choices):
        (call,) = streamed[i]["calls"].values()
        assert call["name"] == "weather" and streamed[i]["finish"] == "tool_calls"
        assert call["arguments"] == c.message.tool_calls[0].function.arguments


def test_tool_messages_go_through_the_template_and_auto_gives_text(client):
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "time", "arguments": '{"zone": "UTC"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]
    args = dict(model="olmoe", max_tokens=4, temperature=0)
    plain = client.chat.completions.create(messages=ASK, **args)
    auto = client.chat.completions.create(messages=history, tools=TOOLS, **args)
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 100  # NOTE: tools, calls
    assert auto.choices[0].message.content and not auto.choices[0].message.tool_calls
    assert auto.choices[0].finish_reason == "length"


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.http}{path}", json=body, headers=server.headers, timeout=60)


CHAT = {"model": "granite", "messages": ASK}
BAD = [
    ("/v1/completions", {"model": "olmoe", "prompt": "x", "tools": TOOLS}, "/v1/chat/completions"),
    ("/v1/chat/completions", CHAT | {"response_format": {"type": "yaml"}}, "response_format"),
    (
        "/v1/chat/completions",
        CHAT | {"response_format": {"type": "json_schema"}},
        "json_schema is required",
    ),
    (
        "/v1/completions",
        {
            "model": "olmoe",
            "prompt": "x",
            "response_format": RESPONSE_FORMAT
            | {"json_schema": {"name": "x", "schema": {"type": "strin"}}},
        },
        "response_format: the json_schema grammar does not compile: Invalid type: strin",
    ),
    (
        "/v1/chat/completions",
        CHAT
        | {
            "response_format": RESPONSE_FORMAT
            | {"json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?=a)"}}}
        },
        "look-around",
    ),
    (
        "/v1/chat/completions",
        CHAT | {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "f"}}},
        "tool_choice names function 'f'",
    ),
    ("/v1/chat/completions", CHAT | {"tool_choice": "required"}, "tool_choice needs tools"),
    (
        "/v1/chat/completions",
        CHAT
        | {
            "tool_choice": "required",
            "tools": [
                TOOLS[0],
                {"type": "function", "function": {"name": "f", "parameters": {"type": 3}}},
            ],
        },
        "tools[1].function.parameters",
    ),
    ("/v1/chat/completions", CHAT | {"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice"),
    (
        "/v1/chat/completions",
        CHAT | {"messages": [{"role": "tool", "content": "12:00"}]},
        "tool_call_id",
    ),
]


@pytest.mark.parametrize(("path", "body", "message"), BAD, ids=[b[2] for b in BAD])
def test_bad_structured_requests_are_400s_naming_the_problem(server, path, body, message):
    response = _post(server, path, body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc) as channel:
        yield pb_grpc.MoEServingStub(channel)


def grpc_chat(**kw) -> pb.GenerateRequest:
    messages = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Who is it?")])
    return pb.GenerateRequest(
        model="granite", chat=messages, temperature=1.0, max_tokens=100, n=4, **kw
    )


def test_grpc_json_schema_and_tool_calls(server, stub):
    auth = [("authorization", f"Bearer {server.api_key}")]
    schema = json.dumps(SCHEMA)
    reply = stub.Generate(
        grpc_chat(seed=600, response_format="json_schema", json_schema=schema), metadata=auth
    )
    assert all(c.finish_reason == "stop" and is_valid(c.text) for c in reply.choices)
    tools = json.dumps(TOOLS)
    calls = stub.Generate(
        grpc_chat(seed=700, tools=tools, tool_choice="required", parallel_tool_calls=False),
        metadata=auth,
    )
    for choice in calls.choices:
        (call,) = choice.tool_calls
        assert choice.finish_reason == "tool_calls" and call.id.startswith("call_")
        assert is_valid(call.arguments, PARAMETERS[call.name]) and not choice.text
    arguments: dict[int, str] = {}
    for message in stub.GenerateStream(
        grpc_chat(seed=800, tools=tools, tool_choice="time"), metadata=auth
    ):
        for choice in message.choices:
            for piece in choice.tool_calls:
                assert piece.name in ("", "time")
                arguments[choice.index] = arguments.get(choice.index, "") + piece.arguments
    assert len(arguments) == 4 and all(is_valid(a, PARAMETERS["time"]) for a in arguments.values())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(response_format="yaml"), "response_format"),
        (dict(response_format="json_schema", json_schema='{"type": "strin"}'), "Invalid type"),
        (dict(response_format="json_schema", json_schema="{nope"), "not valid JSON"),
        (dict(tools=json.dumps(TOOLS), tool_choice="f"), "tool_choice names function 'f'"),
        (dict(tools='[{"type": "function"}]'), "tools.0.function"),
    ],
)
def test_grpc_bad_structured_requests_are_invalid_argument(server, stub, kwargs, message):
    auth = [("authorization", f"Bearer {server.api_key}")]
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(grpc_chat(**kwargs), metadata=auth)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(pb.GenerateRequest(model="olmoe", prompt="x", tools="[]"), metadata=auth)
    assert "apply to chat" in error.value.details()
