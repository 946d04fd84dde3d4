"""`GatewayCore`: what the gateway's HTTP and gRPC APIs share: auth, model lookup, tokenization,
and running a request's prompts on the model's replicas as one stream of events."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from moe_serve.cluster.grammar import GrammarCompiler
from moe_serve.cluster.outputs import RequestOutput
from moe_serve.cluster.params import RequestError, RequestLimits, SamplingParams, StructuredOutput
from moe_serve.deploy import structured
from moe_serve.deploy.access_log import AccessRecord
from moe_serve.deploy.choice_stream import (
    TEXT,
    Collected,
    StreamEvent,
    collect_choices,
    stream_choices,
)
from moe_serve.deploy.errors import ApiError, as_api_error
from moe_serve.deploy.limits import LimitsConfig
from moe_serve.deploy.metrics import GatewayMetrics
from moe_serve.deploy.structured import ToolPlan
from moe_serve.models.tokenizer import TextTokenizer


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    max_model_len: int
    expert_parallel_size: int
    num_experts: int


@dataclass
class ModelEndpoint:
    """A served model as the gateway sees it."""

    info: ModelInfo
    handle: object  # DeploymentHandle of its ModelReplica deployment
    tokenizer: TextTokenizer
    limits: RequestLimits
    grammars: GrammarCompiler  # checks structured-output grammars before queuing


class GatewayCore:
    """The gateway's API-independent half: the Gateway deployment owns one; the handlers of
    both APIs (openai_api, grpc_api) call it."""

    def __init__(
        self,
        endpoints: dict[str, ModelEndpoint],
        api_key: str | None,
        metrics: GatewayMetrics,
        limits: LimitsConfig,
    ) -> None:
        self.endpoints, self.api_key, self.metrics = endpoints, api_key, metrics
        self.limits = limits

    def authorize(self, authorization: str | None) -> None:
        """`Authorization: Bearer <key>` when the server has a key; 401 otherwise."""
        if self.api_key is None:
            return
        scheme, _, key = (authorization or "").partition(" ")
        given = key.strip().encode("utf-8", "surrogateescape")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self.api_key.encode()):
            raise ApiError(
                401,
                "missing or invalid API key (Authorization: Bearer <key>)",
                code="invalid_api_key",
            )

    def count(self, model: str, api: str, status: int) -> None:
        """One finished API request; a name no model has is counted as "-" (clients choose
        it: it must not become a metric label)."""
        self.metrics.count(model if model in self.endpoints else "-", api, status)

    def endpoint(self, name: str) -> ModelEndpoint:
        endpoint = self.endpoints.get(name)
        if endpoint is None:
            raise ApiError(
                404,
                f"model {name!r} does not exist; see /v1/models",
                param="model",
                code="model_not_found",
            )
        return endpoint

    def prompt_ids(self, endpoint: ModelEndpoint, prompt: str | list[int]) -> list[int]:
        ids = endpoint.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        return ids

    def check(
        self, endpoint: ModelEndpoint, prompts: list[list[int]], params: SamplingParams
    ) -> None:
        """The model's limits for each prompt, then the server's for the whole request."""
        max_tokens = [endpoint.limits.check(ids, params) for ids in prompts]
        self.limits.check(params, max_tokens)

    async def check_grammars(
        self, endpoint: ModelEndpoint, checks: tuple[tuple[str, StructuredOutput], ...]
    ) -> None:
        """Compile a request's grammars (off the event loop: a big schema can take a while);
        RequestError naming the first that does not compile."""
        if checks:
            await asyncio.to_thread(structured.check_grammars, endpoint.grammars, checks)

    async def stream(
        self,
        endpoint: ModelEndpoint,
        prompts: list[list[int]],
        params: SamplingParams,
        access: AccessRecord,
        is_echo: bool = False,
        plan: ToolPlan = TEXT,
        is_streamed: bool = True,
    ) -> AsyncIterator[StreamEvent]:
        """Run every prompt (the caller has checked them: `check`); their events
        (choice_stream.stream_choices). The first output is awaited here, so that a request the
        replicas refuse (queue full, replica down, invalid) raises before a response starts."""
        tracker = self.metrics.track(endpoint.info.name, prompts, access)
        outputs = self._outputs(endpoint, prompts, params, is_streamed)
        try:
            first = await anext(outputs)
        except StopAsyncIteration:
            first = None
        except BaseException:
            await outputs.aclose()
            raise
        started = _chain((first,) if first is not None else (), outputs)
        return stream_choices(started, tracker, prompts, params.n, is_echo, plan)

    async def collect(
        self,
        endpoint: ModelEndpoint,
        prompts: list[list[int]],
        params: SamplingParams,
        access: AccessRecord,
    ) -> Collected:
        """Run to completion (choice_stream.collect_choices)."""
        events = await self.stream(
            endpoint, prompts, params, access, is_echo=True, is_streamed=False
        )
        return await collect_choices(events, prompts, params.n)

    async def _outputs(
        self,
        endpoint: ModelEndpoint,
        prompts: list[list[int]],
        params: SamplingParams,
        is_streamed: bool,
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every prompt's outputs, merged: (prompt index, output) as they arrive. Leaving early
        cancels every stream on the replicas (their KV blocks are freed)."""
        queue: asyncio.Queue = asyncio.Queue()
        generate = endpoint.handle.options(stream=True).generate
        streams = [generate.remote(ids, params, uuid.uuid4().hex, is_streamed) for ids in prompts]
        tasks = [asyncio.ensure_future(self._pump(i, s, queue)) for i, s in enumerate(streams)]
        self.metrics.in_flight(endpoint.info.name, len(prompts))
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise as_api_error(item)
                if item is None:
                    remaining -= 1
                    continue
                yield item
        finally:
            self.metrics.in_flight(endpoint.info.name, -len(prompts))
            for task, response in zip(tasks, streams, strict=True):
                if not task.done():
                    task.cancel()
                    response.cancel()

    async def _pump(self, index: int, response, queue: asyncio.Queue) -> None:
        try:
            async for output in response:
                queue.put_nowait((index, output))
            queue.put_nowait(None)
        except Exception as exc:
            queue.put_nowait(exc)


async def _chain(first: tuple, rest: AsyncIterator) -> AsyncIterator:
    async with contextlib.aclosing(rest):
        for item in first:
            yield item
        async for item in rest:
            yield item


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
