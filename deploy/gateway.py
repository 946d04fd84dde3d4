"""The ingress: OpenAI-compatible HTTP (FastAPI) and the gRPC methods Serve's proxy calls by
name, in front of every model's ModelReplica deployment."""

# NOTE: no `from __future__ import annotations` here: FastAPI must see `Request` itself.
import asyncio
import json
import logging
import time

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from grpc_health.v1 import health_pb2
from pydantic import BaseModel, ValidationError
from ray import serve
from starlette.exceptions import HTTPException

from moe_serve.cluster.grammar import GrammarCompiler
from moe_serve.cluster.params import RequestLimits
from moe_serve.deploy import grpc_api, openai_api
from moe_serve.deploy.access_log import AccessRecord, configure_access_log
from moe_serve.deploy.config import ServeConfig, ServedModelConfig, api_key_from_environment
from moe_serve.deploy.errors import ApiError, as_api_error
from moe_serve.deploy.gateway_core import GatewayCore, ModelEndpoint, ModelInfo
from moe_serve.deploy.health import READY_WITHIN_S, Health, assess, needs_serve_status
from moe_serve.deploy.metrics import GatewayMetrics
from moe_serve.deploy.openai_format import models_body
from moe_serve.deploy.openai_protocol import ChatCompletionRequest, CompletionRequest
from moe_serve.deploy.priority import yield_cpu_to_engines
from moe_serve.models.registry import load_config
from moe_serve.models.source import resolve_source
from moe_serve.models.tokenizer import TextTokenizer

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 4 << 20
HEALTH_TIMEOUT_S = 5.0
WATCH_PERIOD_S = 5.0
GRPC_SERVICE = "moeserving.v1.MoEServing"
HEALTH_SERVICES = ("", GRPC_SERVICE)

app = FastAPI(title="moe-serve", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = {404: "no such route", 405: "method not allowed"}.get(
        exc.status_code, str(exc.detail)
    )
    AccessRecord(request.method, request.url.path, status=str(exc.status_code)).write()
    return JSONResponse(ApiError(exc.status_code, message).body(), status_code=exc.status_code)


@app.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    error = as_api_error(exc)
    return JSONResponse(error.body(), status_code=error.status)


async def parse_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """The JSON body as `model`; 413 if too large, 400 with the first problem otherwise."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body exceeds {MAX_BODY_BYTES} bytes")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body exceeds {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "the body is nested too deeply") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        message = "unknown parameter" if first["type"] == "extra_forbidden" else first["msg"]
        raise ApiError(400, f"{where}: {message}", param=where) from None


def build_endpoint(model: ServedModelConfig, handle) -> ModelEndpoint:
    """What the gateway needs of a model: tokenizer, limits (checkpoint metadata only)."""
    directory = resolve_source(model.source, model.revision, metadata_only=True)
    config = load_config(directory)
    max_len = model.max_model_len or config.max_position_embeddings
    info = ModelInfo(
        model.name, config.architecture, max_len, model.expert_parallel_size, config.num_experts
    )
    tokenizer = TextTokenizer.from_dir(directory)
    return ModelEndpoint(
        info,
        handle,
        tokenizer,
        RequestLimits(config.vocab_size, max_len),
        GrammarCompiler(tokenizer.tokenizer, config.vocab_size, config.eos_token_ids),
    )


async def _written_at_end(chunks, access: AccessRecord):
    """A streamed body that writes its access line once it ends (or is cut off)."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        access.write()


def _deployment_statuses() -> dict[str, tuple[str, str]]:
    """Serve's status of each deployment of this application (blocking: run it in a thread)."""
    app_name = serve.get_replica_context().replica_id.deployment_id.app_name
    app = serve.status().applications.get(app_name)
    deployments = app.deployments if app is not None else {}
    return {name: (str(d.status.value), d.message) for name, d in deployments.items()}


def _write_grpc(access: AccessRecord, context) -> None:
    code = context.code() if context is not None else None
    access.status = (code or grpc.StatusCode.OK).name
    access.write()


# NOTE: every helper the class uses is defined above it: Serve pickles the class when it is
# decorated, with the module's globals as they are then.
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096)
@serve.ingress(app)
class Gateway:
    def __init__(self, config: dict, handles: dict, hub) -> None:
        yield_cpu_to_engines()
        serve_config = ServeConfig.model_validate(config)
        self.models, self.config = serve_config.models, serve_config
        endpoints = {m.name: build_endpoint(m, handles[m.name]) for m in serve_config.models}
        self.core = GatewayCore(
            endpoints, api_key_from_environment(), GatewayMetrics(), serve_config.limits
        )
        self.hub = hub
        self.num_watches = 0  # gRPC Health/Watch streams open now
        configure_access_log()

    async def _guarded(self, api: str, body_model, request: Request, handler):
        """Run an API call; every outcome is an OpenAI-shaped response and one access line."""
        access = AccessRecord(request.method, request.url.path)
        try:
            self.core.authorize(request.headers.get("authorization"))
            body = await parse_body(request, body_model)
            access.model = body.model
            response = await handler(self.core, body, access)
        except Exception as exc:
            error = as_api_error(exc)
            self.core.count(access.model, api, error.status)
            access.status = str(error.status)
            access.write()
            return JSONResponse(error.body(), status_code=error.status)
        self.core.count(access.model, api, 200)
        if isinstance(response, StreamingResponse):
            response.body_iterator = _written_at_end(response.body_iterator, access)
        else:
            access.write()
        return response

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._guarded(
            "completions", CompletionRequest, request, openai_api.completions
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._guarded(
            "chat", ChatCompletionRequest, request, openai_api.chat_completions
        )

    @app.get("/v1/models")
    async def models(self, request: Request):
        access = AccessRecord(request.method, request.url.path)
        try:
            self.core.authorize(request.headers.get("authorization"))
        except ApiError as error:
            access.status = str(error.status)
            return JSONResponse(error.body(), status_code=error.status)
        finally:
            access.write()
        return models_body(e.info for e in self.core.endpoints.values())

    @app.get("/health")
    async def health(self):
        """200 when every model can serve (or idles at zero replicas by configuration); 503
        naming the others and why."""
        health = await self._health()
        if not health.is_ok:
            return JSONResponse(ApiError(503, health.message()).body(), status_code=503)
        return {"status": "ok", "models": list(self.core.endpoints), "idle": health.idle}

    async def _health(self) -> Health:
        """NOTE: from the replicas' periodic reports, not a call to them: a call would queue
        behind the generation requests of a busy replica and time out exactly under load."""
        try:
            call = self.hub.model_health.remote(READY_WITHIN_S)
            reports = await asyncio.wait_for(call, HEALTH_TIMEOUT_S)
            statuses = {}
            if needs_serve_status(self.models, reports):
                statuses = await asyncio.wait_for(
                    asyncio.to_thread(_deployment_statuses), HEALTH_TIMEOUT_S
                )
        except Exception as exc:
            log.warning("could not assess health: %s", exc)
            return Health({m.name: f"health unknown ({exc})" for m in self.models})
        return assess(self.models, reports, statuses)

    def requires_api_key(self) -> bool:
        """Whether this gateway found an API key in its environment (`moe-serve run` says)."""
        return self.core.api_key is not None

    @app.get("/metrics")
    async def metrics(self, request: Request):
        if self.config.metrics.require_api_key:
            try:
                self.core.authorize(request.headers.get("authorization"))
            except ApiError as error:
                return JSONResponse(error.body(), status_code=error.status)
        snapshot = await self.hub.snapshot.remote()
        return Response(self.core.metrics.render(snapshot), media_type="text/plain; version=0.0.4")

    # gRPC: Serve's proxy calls the method named like the RPC.
    async def Generate(self, request, grpc_context=None):
        access = AccessRecord("gRPC", f"/{GRPC_SERVICE}/Generate", request.model)
        try:
            return await grpc_api.generate(self.core, request, grpc_context, access)
        finally:
            _write_grpc(access, grpc_context)

    async def GenerateStream(self, request, grpc_context=None):
        access = AccessRecord("gRPC", f"/{GRPC_SERVICE}/GenerateStream", request.model)
        try:
            async for response in grpc_api.generate_stream(
                self.core, request, grpc_context, access
            ):
                yield response
        finally:
            _write_grpc(access, grpc_context)

    async def ListModels(self, request, grpc_context=None):
        access = AccessRecord("gRPC", f"/{GRPC_SERVICE}/ListModels")
        try:
            return grpc_api.list_models(self.core, grpc_context)
        finally:
            _write_grpc(access, grpc_context)

    async def Check(self, request, grpc_context=None):
        """grpc.health.v1.Health/Check for "" or moeserving.v1.MoEServing."""
        if request.service not in HEALTH_SERVICES:
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {request.service!r}")
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=await self._serving_status())

    async def Watch(self, request, grpc_context=None):
        """grpc.health.v1.Health/Watch: the status now, then each change. At most
        `limits.max_health_watches` streams at once: each holds one of this gateway's ongoing
        requests for as long as it stays open, at most `limits.max_health_watch_s` (then it
        ends with OK and the client watches again)."""
        if request.service not in HEALTH_SERVICES:
            yield health_pb2.HealthCheckResponse(
                status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            )
            return
        limit = self.config.limits.max_health_watches
        if self.num_watches >= limit:
            details = (
                f"{limit} health Watch streams are open; this server allows at most {limit} "
                "(limits.max_health_watches): use Check, or watch later"
            )
            grpc_context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            grpc_context.set_details(details)
            raise grpc_api.StreamAborted(details)
        self.num_watches += 1
        try:
            last, end = None, time.monotonic() + self.config.limits.max_health_watch_s
            while (left := end - time.monotonic()) > 0:
                status = await self._serving_status()
                if status != last:
                    yield health_pb2.HealthCheckResponse(status=status)
                    last = status
                await asyncio.sleep(min(WATCH_PERIOD_S, left))
        finally:
            self.num_watches -= 1

    async def _serving_status(self) -> int:
        if not (await self._health()).is_ok:
            return health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse.SERVING
