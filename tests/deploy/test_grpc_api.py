"""The gRPC API through Serve's proxy: every RPC, streaming equals unary, status codes."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe_serve.protos import moe_serving_pb2 as pb
from moe_serve.protos import moe_serving_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.grpc) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.MoEServingStub(channel)


@pytest.fixture(scope="module")
def auth(server):
    return [("authorization", f"Bearer {server.api_key}")]


def test_list_models(stub, auth):
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), metadata=auth).models}
    assert models["granite"].architecture == "GraniteMoeForCausalLM"
    assert models["jetmoe"].expert_parallel_size == 2 and models["jetmoe"].num_experts == 8
    assert models["olmoe"].max_model_len == 512


@pytest.mark.parametrize("model", ["olmoe", "jetmoe", "granite"])
def test_stream_equals_unary(stub, auth, model):
    request = pb.GenerateRequest(
        model=model, prompt="Mixture of experts", max_tokens=10, temperature=0.0
    )
    unary = stub.Generate(request, metadata=auth)
    messages = list(stub.GenerateStream(request, metadata=auth))
    assert "".join(c.text for m in messages for c in m.choices) == unary.choices[0].text
    tokens = [t for m in messages for c in m.choices for t in c.token_ids]
    assert tokens == list(unary.choices[0].token_ids) and len(tokens) == 10
    assert messages[-1].usage.completion_tokens == 10 == unary.usage.completion_tokens
    assert unary.choices[0].finish_reason == "length"


def test_token_ids_chat_n_seed_and_logprobs(stub, auth):
    by_ids = stub.Generate(
        pb.GenerateRequest(
            model="jetmoe",
            prompt_token_ids=pb.TokenIds(ids=[5, 6, 7]),
            max_tokens=4,
            n=2,
            temperature=1.0,
            seed=7,
            logprobs=2,
        ),
        metadata=auth,
    )
    assert [len(c.token_ids) for c in by_ids.choices] == [4, 4]
    assert all(len(lp.top) == 2 for c in by_ids.choices for lp in c.logprobs)
    chat = pb.GenerateRequest(
        model="olmoe",
        max_tokens=5,
        temperature=0.0,
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")]),
    )
    assert len(stub.Generate(chat, metadata=auth).choices[0].token_ids) == 5


@pytest.mark.parametrize(
    ("request_kwargs", "metadata", "code"),
    [
        (dict(model="nope", prompt="x"), True, grpc.StatusCode.NOT_FOUND),
        (dict(model="olmoe", prompt="x", temperature=-1.0), True, grpc.StatusCode.INVALID_ARGUMENT),
        (dict(model="olmoe"), True, grpc.StatusCode.INVALID_ARGUMENT),
        (
            dict(model="olmoe", prompt_token_ids=pb.TokenIds(ids=[10**7])),
            True,
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (dict(model="olmoe", prompt="x"), False, grpc.StatusCode.UNAUTHENTICATED),
        (
            dict(
                model="olmoe",
                echo=True,
                chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")]),
            ),
            True,
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ],
)
def test_error_codes(stub, auth, request_kwargs, metadata, code):
    request = pb.GenerateRequest(**request_kwargs)
    for call in (
        stub.Generate,
        lambda r, metadata: list(stub.GenerateStream(r, metadata=metadata)),
    ):
        with pytest.raises(grpc.RpcError) as error:
            call(request, metadata=auth if metadata else [])
        assert error.value.code() == code and error.value.details()


def test_health_service(channel):
    health = health_pb2_grpc.HealthStub(channel)
    assert (
        health.Check(health_pb2.HealthCheckRequest()).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    with pytest.raises(grpc.RpcError) as error:
        health.Check(health_pb2.HealthCheckRequest(service="other.Service"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    watch = health.Watch(health_pb2.HealthCheckRequest())
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    unknown = health.Watch(health_pb2.HealthCheckRequest(service="other.Service"))
    assert [r.status for r in unknown] == [health_pb2.HealthCheckResponse.SERVICE_UNKNOWN]


def test_a_repeated_prompt_reports_its_cached_tokens(stub, auth):
    ids = pb.TokenIds(ids=[11 + (i * 53) % 190 for i in range(40)])  # NOTE: shared by no test
    request = pb.GenerateRequest(model="granite", prompt_token_ids=ids, max_tokens=2)
    assert stub.Generate(request, metadata=auth).usage.cached_tokens == 0
    # NOTE: 40 prompt tokens: two whole blocks of 16 cached, the last token always computed
    assert stub.Generate(request, metadata=auth).usage.cached_tokens == 32
    assert list(stub.GenerateStream(request, metadata=auth))[-1].usage.cached_tokens == 32
