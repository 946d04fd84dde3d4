"""Backpressure (429 / RESOURCE_EXHAUSTED at once) and autoscaling from 1 to 2 replicas."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import httpx
import pytest

from moe_serve.protos import moe_serving_pb2 as pb
from moe_serve.protos import moe_serving_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow


async def _fire(server, model: str, count: int, max_tokens: int, stream=False) -> list[int]:
    body = {"model": model, "prompt": "x y z", "max_tokens": max_tokens, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=300, headers=server.headers) as client:
        responses = await asyncio.gather(
            *(
                client.post(f"{server.http}/v1/completions", json=body | {"stream": stream})
                for _ in range(count)
            )
        )
    for response in responses:
        if response.status_code == 429:
            assert response.json()["error"]["code"] == "queue_full"
        else:
            assert not any("error" in body for body in _bodies(response)), response.text
    return [r.status_code for r in responses]


def _bodies(response: httpx.Response) -> list[dict]:
    """The JSON body, or every SSE event's."""
    if response.headers["content-type"].startswith("text/event-stream"):
        lines = response.text.splitlines()
        return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    return [response.json()]


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_full_queue_answers_429_at_once(server, stream):
    statuses = asyncio.run(_fire(server, "tight", 6, 200, stream))
    assert 429 in statuses and 200 in statuses, statuses
    assert set(statuses) <= {200, 429}


def test_health_stays_ok_while_a_model_is_saturated(server):
    async def burst_and_probe():
        burst = asyncio.ensure_future(_fire(server, "tight", 4, 500))
        async with httpx.AsyncClient(timeout=60) as client:
            while not burst.done():  # NOTE: probe for the whole burst
                response = await client.get(f"{server.http}/health")
                assert response.status_code == 200, response.text
        return await burst

    statuses = asyncio.run(burst_and_probe())
    assert 429 in statuses  # NOTE: the model was saturated while /health answered 200


def test_full_queue_is_resource_exhausted_over_grpc(server):
    request = pb.GenerateRequest(model="tight", prompt="x", max_tokens=200, ignore_eos=True)
    metadata = [("authorization", f"Bearer {server.api_key}")]

    async def burst():
        async with grpc.aio.insecure_channel(server.grpc) as channel:
            stub = pb_grpc.MoEServingStub(channel)
            calls = [stub.Generate(request, metadata=metadata) for _ in range(6)]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(burst())
    codes = {r.code() for r in results if isinstance(r, grpc.RpcError)}
    assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}, results
    assert any(isinstance(r, pb.GenerateResponse) for r in results)


def _replicas(deployment: str) -> int:
    from ray import serve

    status = serve.status().applications["moe-serve"].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def _replica_ids_that_served(server, model: str) -> set[str]:
    ids = set()
    for line in httpx.get(f"{server.http}/metrics", timeout=30).text.splitlines():
        is_steps = line.startswith("moe_serve_engine_steps_total") and f'model="{model}"' in line
        if is_steps and float(line.rsplit(" ", 1)[1]) > 0:
            ids.add(line.split('replica="')[1].split('"')[0])
    return ids


def test_autoscaling_adds_a_replica_under_load_and_both_serve(server):
    assert _replicas("model-scaling") == 1
    deadline = time.monotonic() + 240
    while _replicas("model-scaling") < 2 and time.monotonic() < deadline:
        asyncio.run(_fire(server, "scaling", 8, 64))
    assert _replicas("model-scaling") == 2
    deadline = time.monotonic() + 120
    while len(_replica_ids_that_served(server, "scaling")) < 2 and time.monotonic() < deadline:
        asyncio.run(_fire(server, "scaling", 8, 16))
    assert len(_replica_ids_that_served(server, "scaling")) == 2
