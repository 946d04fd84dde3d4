"""Faults seen from outside, on the shared server's `ondemand` model (EP=2, min_replicas 0): idle
at zero replicas it is healthy and its first request starts it; a killed engine actor, expert
shards that cannot be rebuilt, and a killed gateway each cost the requests in flight of that
model, after which it serves again; the other models never notice."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe_serve.deploy.app import APP_NAME

pytestmark = pytest.mark.slow
MODEL, DEPLOYMENT = "ondemand", "model-ondemand"
RECOVERY_S = 180  # NOTE: a new gang loads in ~30 s on two busy cores; Serve notices within 10 s


def _complete(server, model: str = MODEL, **extra) -> httpx.Response:
    body = {"model": model, "prompt": "hello", "max_tokens": 4} | extra
    return httpx.post(
        f"{server.http}/v1/completions", json=body, headers=server.headers, timeout=300
    )


def _running() -> int:
    from ray import serve

    deployment = serve.status().applications[APP_NAME].deployments[DEPLOYMENT]
    return deployment.replica_states.get("RUNNING", 0)


def _pids() -> dict:
    """The engine actor's and shards' process ids of the model's (one) replica."""
    from ray import serve

    handle = serve.get_deployment_handle(DEPLOYMENT, APP_NAME)
    return handle.actor_pids.remote().result(timeout_s=60)


def _eventually(condition: Callable[[], object], timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = condition()
        except Exception:  # NOTE: a replica or the gateway being replaced
            result = None
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f}s"
        time.sleep(1)


def _serves_again(server, old_engine: int) -> float:
    """Seconds until the model answers 200 from a new replica."""
    started = time.monotonic()
    _eventually(lambda: _complete(server).status_code == 200, RECOVERY_S, "serving again")
    assert _pids()["engine"] != old_engine
    return time.monotonic() - started


def _start_stream(server, model: str = MODEL):
    """A long streamed completion, returned once its first chunk arrived."""
    body = {"model": model, "prompt": "go", "max_tokens": 400, "ignore_eos": True, "stream": True}
    request = httpx.stream(
        "POST", f"{server.http}/v1/completions", json=body, headers=server.headers, timeout=120
    )
    response = request.__enter__()
    lines = response.iter_lines()
    assert next(line for line in lines if line.startswith("data: {"))
    return request, lines


def _rest_of(request, lines) -> list[str]:
    """The stream's remaining events (an error when the connection itself broke)."""
    try:
        return [line for line in lines if line.startswith("data: ")]
    except httpx.HTTPError as exc:
        return [f"data: {json.dumps({'error': {'message': str(exc)}})}"]
    finally:
        request.__exit__(None, None, None)


def test_a_model_idling_at_zero_replicas_is_healthy_and_starts_on_its_first_request(server):
    assert _running() == 0
    health = httpx.get(f"{server.http}/health", timeout=30)
    assert health.status_code == 200, health.text
    assert health.json()["idle"] == [MODEL]
    with grpc.insecure_channel(server.grpc) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    response = _complete(server)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 4
    assert _running() == 1
    assert httpx.get(f"{server.http}/health", timeout=30).status_code == 200


def test_a_killed_engine_actor_costs_only_its_requests_in_flight(server):
    assert _complete(server).status_code == 200  # NOTE: started, whatever ran before
    old = _pids()
    request, lines = _start_stream(server)
    os.kill(old["engine"], signal.SIGKILL)
    events = _rest_of(request, lines)
    assert '"error"' in events[-2] and events[-1] == "data: [DONE]", events[-3:]
    assert _complete(server, "olmoe").status_code == 200  # NOTE: another model, meanwhile
    assert _serves_again(server, old["engine"]) < RECOVERY_S


def test_shards_that_cannot_be_rebuilt_make_serve_replace_the_replica(server, ondemand_checkpoint):
    assert _complete(server).status_code == 200
    old = _pids()
    weights = ondemand_checkpoint / "model.safetensors"
    hidden = ondemand_checkpoint.parent / "hidden.safetensors"
    weights.rename(hidden)  # NOTE: every rebuild's shards now fail to load
    try:
        os.kill(old["shards"][0], signal.SIGKILL)

        def degraded() -> str | None:
            response = httpx.get(f"{server.http}/health", timeout=30)
            message = response.json().get("error", {}).get("message", "")
            return message if response.status_code == 503 and "(2 of 2)" in message else None

        message = _eventually(degraded, 120, "/health naming the model that gave up")
        assert f"{MODEL}: rebuilding the expert shards failed (2 of 2)" in message
        metrics = httpx.get(f"{server.http}/metrics", timeout=30).text
        assert f'moe_serve_shard_rebuild_failures_total{{model="{MODEL}"' in metrics
    finally:
        hidden.rename(weights)  # NOTE: the replacement loads
    assert _serves_again(server, old["engine"]) < RECOVERY_S
    _eventually(
        lambda: httpx.get(f"{server.http}/health", timeout=30).status_code == 200, 60, "healthy"
    )


def _gateway_pid() -> int:
    import ray

    (pid,) = [
        info["Pid"]
        for info in ray._private.state.actors().values()
        if info["State"] == "ALIVE" and info["ActorClassName"].endswith(f":{APP_NAME}:Gateway")
    ]
    return pid


def test_a_killed_gateway_is_restarted_and_serves_again(server):
    pid = _gateway_pid()
    request, lines = _start_stream(server, "olmoe")
    os.kill(pid, signal.SIGKILL)
    events = _rest_of(request, lines)
    assert "data: [DONE]" not in events or any('"error"' in e for e in events), events[-3:]
    started = time.monotonic()
    _eventually(lambda: _complete(server, "olmoe").status_code == 200, RECOVERY_S, "the gateway")
    assert time.monotonic() - started < 60
    assert _gateway_pid() != pid
