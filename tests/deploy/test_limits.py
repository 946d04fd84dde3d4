"""The shared server's bounds on hostile input (its `limits:` block), each a 400 /
INVALID_ARGUMENT naming the limit over HTTP and gRPC alike; at most `max_health_watches` gRPC
health Watch streams at once, each ending after `max_health_watch_s`; and its API key nowhere
in what Serve and Ray show."""

from __future__ import annotations

import json
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe_serve.protos import moe_serving_pb2 as pb
from moe_serve.protos import moe_serving_pb2_grpc as pb_grpc
from tests.deploy.conftest import WATCH_S

pytestmark = pytest.mark.slow

BOUNDS = {  # NOTE: the fixture allows 4096 completion tokens per request, 2 Watch streams
    "stop_token_ids": ({"stop_token_ids": list(range(65))}, "limits.max_stop_token_ids"),
    "stop strings": ({"stop": [f"s{i}" for i in range(17)]}, "limits.max_stop_strings"),
    "a long stop string": ({"stop": ["x" * 257]}, "limits.max_stop_string_chars"),
    "n x max_tokens": ({"n": 16, "max_tokens": 300}, "limits.max_completion_tokens_per_request"),
    "prompts x max_tokens": (
        {"prompt": ["a", "b", "c", "d", "e"], "max_tokens": 500, "n": 2},
        "limits.max_completion_tokens_per_request",
    ),
}


@pytest.mark.parametrize("case", sorted(BOUNDS))
def test_each_bound_is_a_400_naming_the_limit(server, case):
    extra, key = BOUNDS[case]
    body = {"model": "olmoe", "prompt": "x"} | extra
    for stream in (False, True):
        response = httpx.post(
            f"{server.http}/v1/completions",
            json=body | {"stream": stream},
            headers=server.headers,
            timeout=60,
        )
        assert response.status_code == 400, response.text
        assert key in response.json()["error"]["message"]


def test_an_unset_max_tokens_counts_as_what_the_prompt_leaves(server):
    body = {"model": "olmoe", "messages": [{"role": "user", "content": "hi"}], "n": 16}
    response = httpx.post(
        f"{server.http}/v1/chat/completions", json=body, headers=server.headers, timeout=60
    )
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "max_tokens (unset, up to " in message
    assert "limits.max_completion_tokens_per_request" in message


def _grpc_request(extra: dict) -> pb.GenerateRequest:
    fields = {"model": "olmoe", "prompt": "x"} | extra
    return pb.GenerateRequest(**fields)


GRPC_CASES = ["stop_token_ids", "stop strings", "a long stop string", "n x max_tokens"]


@pytest.mark.parametrize("case", GRPC_CASES)
def test_each_bound_is_invalid_argument_over_grpc(server, case):
    extra, key = BOUNDS[case]
    metadata = [("authorization", f"Bearer {server.api_key}")]
    with grpc.insecure_channel(server.grpc) as channel:
        stub = pb_grpc.MoEServingStub(channel)
        stream = lambda r, metadata: list(stub.GenerateStream(r, metadata=metadata))  # noqa: E731
        for call in (stub.Generate, stream):
            with pytest.raises(grpc.RpcError) as error:
                call(_grpc_request(extra), metadata=metadata)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert key in error.value.details()


def _open_watch(health) -> tuple[object, int]:
    """A Watch stream and its first status (RpcError if refused). Its deadline outlives the
    server's `max_health_watch_s`: a stream the server never ends fails DEADLINE_EXCEEDED."""
    watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=WATCH_S + 60)
    return watch, next(watch).status


def _open_watches(health, num: int, wait_s: float, why: str) -> list[tuple[object, int]]:
    """`num` Watch streams at once, retried for up to `wait_s` while slots are still held."""
    deadline = time.monotonic() + wait_s
    while True:
        opened = []
        try:
            for _ in range(num):
                opened.append(_open_watch(health))
            return opened
        except grpc.RpcError:
            for call, _ in opened:  # NOTE: else this loop itself holds the slots
                call.cancel()
            assert time.monotonic() < deadline, why
            time.sleep(0.5)


def test_health_watch_streams_are_bounded_freed_when_closed_and_end_in_time(server):
    with grpc.insecure_channel(server.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        # NOTE: another test's stream that Serve's proxy never cancelled ends after WATCH_S
        first, second = _open_watches(
            health, 2, WATCH_S + 30, "Watch streams of other tests stay open"
        )
        assert first[1] == second[1] == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as error:
            _open_watch(health)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limits.max_health_watches" in error.value.details()
        assert (
            health.Check(health_pb2.HealthCheckRequest()).status
            == health_pb2.HealthCheckResponse.SERVING
        )  # NOTE: Check is never bounded
        first[0].cancel()
        (third,) = _open_watches(health, 1, 30, "a closed Watch stream was never freed")
        third[0].cancel()
        # NOTE: the server ends a stream after limits.max_health_watch_s, with OK
        list(second[0])  # NOTE: raises if the stream fails (DEADLINE_EXCEEDED: never ended)
        assert second[0].code() == grpc.StatusCode.OK


def test_the_api_key_is_nowhere_in_what_serve_and_ray_show(server):
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    from moe_serve.deploy.app import APP_NAME

    client = _get_global_client()
    # NOTE: what `serve status`, Serve's REST API and the dashboard show, and Ray's actor table
    # (every actor's runtime_env); then what Serve keeps of the gateway's arguments
    shown = json.dumps(client.get_serve_details(), default=str) + repr(serve.status())
    shown += json.dumps(ray._private.state.actors(), default=str)
    assert server.api_key not in shown
    info, _ = client.get_deployment_info("Gateway", APP_NAME)
    assert server.api_key.encode() not in info.replica_config.serialized_init_args
    assert httpx.get(f"{server.http}/v1/models", timeout=30).status_code == 401
