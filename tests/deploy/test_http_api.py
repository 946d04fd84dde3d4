"""The OpenAI-compatible HTTP API, driven by the official `openai` client and raw requests."""

from __future__ import annotations

import json
import time

import grpc
import httpx
import pytest
from openai import OpenAI

from moe_serve.protos import moe_serving_pb2 as pb
from moe_serve.protos import moe_serving_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
MODELS = ("olmoe", "jetmoe", "granite")


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server.http}/v1", api_key=server.api_key, max_retries=0, timeout=120)


def test_models_lists_every_architecture(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(MODELS) <= set(models)
    assert models["jetmoe"].model_extra["expert_parallel_size"] == 2
    assert models["olmoe"].model_extra["architecture"] == "OlmoeForCausalLM"


@pytest.mark.parametrize("model", MODELS)
def test_completion_streaming_equals_unary_for_greedy(client, model):
    args = dict(model=model, prompt="The router picks", max_tokens=12, temperature=0)
    unary = client.completions.create(**args)
    chunks = list(
        client.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == unary.choices[0].text and unary.choices[0].text
    assert unary.usage.completion_tokens == 12 and unary.choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_chat_streaming_equals_unary_with_n_and_seed(client):
    args = dict(
        model="olmoe",
        messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=10,
        temperature=1.0,
        seed=1234,
        n=2,
    )
    unary = client.chat.completions.create(**args)
    texts = {0: "", 1: ""}
    for chunk in client.chat.completions.create(**args, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert [texts[0], texts[1]] == [c.message.content for c in unary.choices]
    assert texts[0] != texts[1]  # seeds 1234 and 1235
    again = client.chat.completions.create(**args)
    assert [c.message.content for c in again.choices] == [c.message.content for c in unary.choices]


def test_batched_token_prompts_logprobs_and_echo(client):
    response = client.completions.create(
        model="granite",
        prompt=[[5, 6, 7], [8, 9]],
        max_tokens=3,
        temperature=0,
        logprobs=2,
        echo=True,
    )
    assert len(response.choices) == 2
    first = response.choices[0]
    assert len(first.logprobs.tokens) == 3 + 3 and first.logprobs.token_logprobs[0] is None
    assert all(len(top) == 2 for top in first.logprobs.top_logprobs[1:])
    assert response.usage.prompt_tokens == 5 and response.usage.completion_tokens == 6


def test_chat_logprobs(client):
    response = client.chat.completions.create(
        model="olmoe",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = response.choices[0].logprobs.content
    assert len(content) == 4 and all(len(item.top_logprobs) == 3 for item in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)


def _post(server, path, body=None, raw=None, headers=None, method="POST"):
    headers = server.headers | (headers or {})
    return httpx.request(
        method, f"{server.http}{path}", json=body, content=raw, headers=headers, timeout=60
    )


HOSTILE = [
    ("bad json", dict(raw=b"{nope"), 400),
    ("json array", dict(raw=b"[1, 2]"), 400),
    ("missing model", dict(body={"prompt": "x"}), 400),
    ("unknown model", dict(body={"model": "gpt-5", "prompt": "x"}), 404),
    ("prompt is a number", dict(body={"model": "olmoe", "prompt": 42}), 400),
    ("empty prompt", dict(body={"model": "olmoe", "prompt": ""}), 400),
    ("negative max_tokens", dict(body={"model": "olmoe", "prompt": "x", "max_tokens": -1}), 400),
    ("max_tokens as text", dict(body={"model": "olmoe", "prompt": "x", "max_tokens": "9"}), 400),
    ("temperature too high", dict(body={"model": "olmoe", "prompt": "x", "temperature": 9.5}), 400),
    ("top_p zero", dict(body={"model": "olmoe", "prompt": "x", "top_p": 0}), 400),
    ("n zero", dict(body={"model": "olmoe", "prompt": "x", "n": 0}), 400),
    ("too many logprobs", dict(body={"model": "olmoe", "prompt": "x", "logprobs": 50}), 400),
    ("token id out of vocabulary", dict(body={"model": "olmoe", "prompt": [1, 10**6]}), 400),
    ("negative token id", dict(body={"model": "olmoe", "prompt": [1, -3]}), 400),
    ("prompt longer than max_model_len", dict(body={"model": "olmoe", "prompt": [3] * 600}), 400),
    (
        "prompt + max_tokens too long",
        dict(body={"model": "olmoe", "prompt": [3] * 500, "max_tokens": 100}),
        400,
    ),
    ("unknown parameter", dict(body={"model": "olmoe", "prompt": "x", "best_of": 3}), 400),
    ("stop is a number", dict(body={"model": "olmoe", "prompt": "x", "stop": 7}), 400),
    ("negative seed", dict(body={"model": "olmoe", "prompt": "x", "seed": -1}), 400),
    ("body too large", dict(raw=b'{"model": "olmoe", "prompt": "' + b"a" * (5 << 20) + b'"}'), 413),
    (
        "no api key",
        dict(body={"model": "olmoe", "prompt": "x"}, headers={"Authorization": ""}),
        401,
    ),
    (
        "wrong api key",
        dict(body={"model": "olmoe", "prompt": "x"}, headers={"Authorization": "Bearer guess"}),
        401,
    ),
    (
        "non-ascii api key",
        dict(body={"model": "olmoe", "prompt": "x"}, headers={"Authorization": "Bearer clé"}),
        401,
    ),
    ("nested too deeply", dict(raw=b'{"model": "olmoe", "prompt": ' + b"[" * 10**5 + b"}"), 400),
    ("too many prompts", dict(body={"model": "olmoe", "prompt": ["x"] * 65}), 400),
]
HOSTILE_CHAT = [
    ("unknown role", {"model": "olmoe", "messages": [{"role": "robot", "content": "x"}]}, 400),
    ("no messages", {"model": "olmoe", "messages": []}, 400),
    ("content is a number", {"model": "olmoe", "messages": [{"role": "user", "content": 3}]}, 400),
    (
        "top_logprobs without logprobs",
        {"model": "olmoe", "top_logprobs": 2, "messages": [{"role": "user", "content": "x"}]},
        400,
    ),
]


@pytest.mark.parametrize(("case", "request_args", "status"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_completion_requests(server, case, request_args, status):
    headers = {"content-type": "application/json"} | {
        name: value.encode("latin-1")  # NOTE: as a client may send it, not only ASCII
        for name, value in request_args.pop("headers", {}).items()
    }
    response = _post(server, "/v1/completions", headers=headers, **request_args)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in response.text and 'File "' not in response.text


@pytest.mark.parametrize(("case", "body", "status"), HOSTILE_CHAT, ids=[c[0] for c in HOSTILE_CHAT])
def test_hostile_chat_requests(server, case, body, status):
    response = _post(server, "/v1/chat/completions", body=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]


def test_wrong_method_and_route(server):
    assert _post(server, "/v1/completions", method="GET").status_code == 405
    missing = _post(server, "/v1/engines", method="GET")
    assert missing.status_code == 404 and missing.json()["error"]["message"]


def test_still_serving_after_the_hostile_requests(client):
    response = client.completions.create(model="olmoe", prompt="still alive", max_tokens=3)
    assert response.usage.completion_tokens == 3


def test_health_and_metrics(server, client):
    assert httpx.get(f"{server.http}/health", timeout=30).json()["status"] == "ok"
    client.completions.create(model="jetmoe", prompt="count me", max_tokens=2)
    with grpc.insecure_channel(server.grpc) as channel:
        pb_grpc.MoEServingStub(channel).Generate(
            pb.GenerateRequest(model="olmoe", prompt="count me", max_tokens=2),
            metadata=[("authorization", f"Bearer {server.api_key}")],
        )
    deadline = time.monotonic() + 30
    text = ""
    while time.monotonic() < deadline and "moe_serve_expert_tokens_total{" not in text:
        text = httpx.get(f"{server.http}/metrics", timeout=30).text
        time.sleep(0.5)
    assert 'moe_serve_requests_total{api="grpc_generate",model="olmoe",status="200"}' in text
    for name in (
        "moe_serve_requests_total",
        "moe_serve_generation_tokens_total",
        "moe_serve_time_to_first_token_seconds_bucket",
        "moe_serve_kv_cache_usage_ratio",
        "moe_serve_dispatch_bytes_total",
        "moe_serve_expert_tokens_total{",
        "moe_serve_shard_tokens_total{",
        "moe_serve_eplb_layouts_total{",
        "moe_serve_overlapped_steps_total{",
        "moe_serve_prefix_cache_queries_total{",
        "moe_serve_prefix_cache_hits_total{",
    ):
        assert name in text, name


def _kv_usage(server, model: str) -> float:
    for line in httpx.get(f"{server.http}/metrics", timeout=30).text.splitlines():
        if line.startswith("moe_serve_kv_cache_usage_ratio") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return -1.0


def test_client_disconnect_mid_stream_frees_the_request(server):
    body = {
        "model": "granite",
        "prompt": "a long story",
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream(
        "POST", f"{server.http}/v1/completions", json=body, headers=server.headers, timeout=60
    ) as response:
        events = (line[6:] for line in response.iter_lines() if line.startswith("data: "))
        seen = [json.loads(next(events)) for _ in range(3)]
        assert all(chunk["choices"] for chunk in seen)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _kv_usage(server, "granite") <= 0:
            time.sleep(0.2)
        assert _kv_usage(server, "granite") > 0  # the request holds KV blocks
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _kv_usage(server, "granite") != 0:
        time.sleep(0.2)
    assert _kv_usage(server, "granite") == 0


def test_streamed_logprobs_equal_unary_with_echo(client):
    args = dict(model="olmoe", prompt=[5, 6, 7], max_tokens=6, temperature=0, logprobs=2, echo=True)
    unary = client.completions.create(**args).choices[0].logprobs
    streamed = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for chunk in client.completions.create(**args, stream=True):
        for name, values in streamed.items():
            values.extend(getattr(chunk.choices[0].logprobs, name))
    assert streamed["tokens"] == unary.tokens and len(unary.tokens) == 3 + 6
    assert streamed["text_offset"] == unary.text_offset
    assert streamed["token_logprobs"] == pytest.approx(unary.token_logprobs)


def _cached_tokens_expected(prompt_len: int, block_size: int = 16) -> int:
    """Whole cache blocks of the prompt, keeping its last token to compute (its logits)."""
    return (prompt_len - 1) // block_size * block_size


@pytest.mark.parametrize("model", ["olmoe", "jetmoe"])
def test_a_repeated_prompt_reports_its_cached_tokens(client, model):
    prompt = [7 + (i * 37 + len(model)) % 200 for i in range(45)]  # NOTE: shared by no test
    args = dict(model=model, prompt=prompt, max_tokens=2, temperature=0)
    cold = client.completions.create(**args)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    warm = client.completions.create(**args)
    assert warm.usage.prompt_tokens_details.cached_tokens == _cached_tokens_expected(45) == 32
    assert warm.choices[0].text == cold.choices[0].text
    chunks = list(
        client.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 32
    body = {"model": model, "messages": [{"role": "user", "content": "hi " * 30}]}
    first, second = (
        httpx.post(
            f"{client.base_url}chat/completions",
            json=body | {"max_tokens": 2},
            headers={"Authorization": f"Bearer {client.api_key}"},
            timeout=120,
        ).json()
        for _ in range(2)
    )
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    num_prompt = second["usage"]["prompt_tokens"]
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == _cached_tokens_expected(num_prompt) > 0
