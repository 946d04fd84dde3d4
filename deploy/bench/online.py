"""`moe-serve bench online`: an asyncio load generator against a running server (HTTP or
gRPC), streaming every request to measure time to first token and time per output token."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass

import grpc
import httpx

from moe_serve.deploy.bench.workload import WorkItem, Workload
from moe_serve.protos import moe_serving_pb2 as pb
from moe_serve.protos import moe_serving_pb2_grpc as pb_grpc


@dataclass
class RequestResult:
    ok: bool
    output_tokens: int = 0
    ttft_s: float = 0.0
    tpot_s: float = 0.0  # mean time per output token after the first
    latency_s: float = 0.0
    error: str = ""


@dataclass(frozen=True)
class Target:
    model: str
    url: str | None = None  # http://host:port
    grpc_address: str | None = None  # host:port
    api_key: str | None = None
    temperature: float = 0.0
    is_streamed: bool = True  # HTTP only: False sends `"stream": false` (one JSON body)


def _finish(result: RequestResult, start: float, first: float | None, end: float) -> None:
    result.latency_s = end - start
    if first is not None:
        result.ttft_s = first - start
        if result.output_tokens > 1:
            result.tpot_s = (end - first) / (result.output_tokens - 1)


async def _http_request(
    client: httpx.AsyncClient, target: Target, item: WorkItem, seed: int
) -> RequestResult:
    body = {
        "model": target.model,
        "prompt": item.prompt_ids,
        "max_tokens": item.max_tokens,
        "temperature": target.temperature,
        "seed": seed,
        "ignore_eos": True,
        "stream": target.is_streamed,
        "logprobs": 0,
    }
    if not target.is_streamed:
        return await _http_unary(client, target, body)
    result, start, first = RequestResult(ok=True), time.perf_counter(), None
    async with client.stream("POST", f"{target.url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return _refused(response)
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return RequestResult(ok=False, error=chunk["error"]["message"])
            for choice in chunk["choices"]:  # NOTE: logprobs: 0 lists every new token
                new = len((choice.get("logprobs") or {}).get("tokens", []))
                if new:
                    first = first or time.perf_counter()
                    result.output_tokens += new
    _finish(result, start, first, time.perf_counter())
    return result


def _refused(response: httpx.Response) -> RequestResult:
    return RequestResult(ok=False, error=f"HTTP {response.status_code}: {response.text[:200]}")


async def _http_unary(client: httpx.AsyncClient, target: Target, body: dict) -> RequestResult:
    """A non-streamed completion: its tokens arrive at once (time to first token = latency)."""
    start = time.perf_counter()
    response = await client.post(f"{target.url}/v1/completions", json=body)
    end = time.perf_counter()
    if response.status_code != 200:
        return _refused(response)
    tokens = response.json()["usage"]["completion_tokens"]
    return RequestResult(ok=True, output_tokens=tokens, ttft_s=end - start, latency_s=end - start)


async def _grpc_request(stub, target: Target, item: WorkItem, seed: int) -> RequestResult:
    request = pb.GenerateRequest(
        model=target.model,
        prompt_token_ids=pb.TokenIds(ids=item.prompt_ids),
        max_tokens=item.max_tokens,
        temperature=target.temperature,
        seed=seed,
        ignore_eos=True,
    )
    metadata = [("authorization", f"Bearer {target.api_key}")] if target.api_key else []
    result, start, first = RequestResult(ok=True), time.perf_counter(), None
    try:
        async for message in stub.GenerateStream(request, metadata=metadata):
            for choice in message.choices:
                if choice.token_ids:
                    first = first or time.perf_counter()
                    result.output_tokens += len(choice.token_ids)
    except grpc.aio.AioRpcError as exc:
        return RequestResult(ok=False, error=f"{exc.code().name}: {exc.details()}")
    _finish(result, start, first, time.perf_counter())
    return result


async def run_load(
    target: Target, workload: Workload, items: list[WorkItem], progress=None
) -> tuple[float, list[RequestResult]]:
    """Closed loop (`workload.concurrency` in flight) or, with `workload.request_rate`, open
    loop (Poisson arrivals, no cap). Wall seconds and per-request results in workload order."""
    results: list[RequestResult | None] = [None] * len(items)
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    limits = httpx.Limits(
        max_connections=None if workload.request_rate else workload.concurrency + 4
    )
    async with (
        httpx.AsyncClient(timeout=600, headers=headers, limits=limits) as client,
        grpc.aio.insecure_channel(target.grpc_address or "localhost:1") as channel,
    ):
        stub = pb_grpc.MoEServingStub(channel)

        async def one(index: int) -> None:
            seed = workload.seed + index
            try:
                if target.grpc_address:
                    results[index] = await _grpc_request(stub, target, items[index], seed)
                else:
                    results[index] = await _http_request(client, target, items[index], seed)
            except (httpx.HTTPError, OSError) as exc:
                results[index] = RequestResult(ok=False, error=repr(exc))
            if progress is not None:
                progress.update(1)

        start = time.perf_counter()
        if workload.request_rate:
            await _open_loop(one, len(items), workload.request_rate, workload.seed)
        else:
            await _closed_loop(one, len(items), workload.concurrency)
        return time.perf_counter() - start, results


async def _closed_loop(one, num_requests: int, concurrency: int) -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(num_requests):
        queue.put_nowait(index)

    async def worker() -> None:
        while not queue.empty():
            await one(queue.get_nowait())

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _open_loop(one, num_requests: int, rate: float, seed: int) -> None:
    """Requests arrive as a Poisson process of `rate` per second, whatever is in flight."""
    rng, tasks = random.Random(seed), []
    for index in range(num_requests):
        tasks.append(asyncio.ensure_future(one(index)))
        await asyncio.sleep(rng.expovariate(rate))  # NOTE: the arrival process itself
    await asyncio.gather(*tasks)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    cuts = (
        statistics.quantiles(values, n=100, method="inclusive")
        if len(values) > 1
        else [values[0]] * 99
    )
    return {"p50": cuts[49], "p90": cuts[89], "p99": cuts[98]}


def summarize(seconds: float, results: list[RequestResult]) -> dict:
    done = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in done)
    return {
        "seconds": seconds,
        "requests": len(results),
        "errors": len(results) - len(done),
        "error_examples": sorted({r.error for r in results if not r.ok})[:3],
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / seconds,
        "requests_per_s": len(done) / seconds,
        "ttft_s": percentiles([r.ttft_s for r in done]),
        "tpot_s": percentiles([r.tpot_s for r in done if r.output_tokens > 1]),
        "latency_s": percentiles([r.latency_s for r in done]),
    }


def sweep(
    target: Target,
    workload: Workload,
    concurrencies: list[int],
    vocab_limit: int,
    show_progress: bool = True,
) -> list[dict]:
    """One summary per concurrency level, each with the same request mix."""
    from tqdm import tqdm

    items = workload.items(vocab_limit)
    rows = []
    for concurrency in concurrencies:
        level = Workload(**asdict(workload) | {"concurrency": concurrency})
        with tqdm(
            total=len(items), desc=f"concurrency {concurrency}", disable=not show_progress
        ) as progress:
            seconds, results = asyncio.run(run_load(target, level, items, progress))
        rows.append(
            {
                "concurrency": concurrency,
                "request_rate": workload.request_rate,
                **summarize(seconds, results),
                "latencies_s": sorted(r.latency_s for r in results if r.ok),
            }
        )
    return rows
