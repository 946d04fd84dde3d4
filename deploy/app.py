"""The Serve application: a Gateway ingress in front of one ModelReplica deployment per model,
plus the metrics hub. `build_app` is the import path Serve config files use:
`import_path: moe_serve.deploy.app:build_app`, `args:` the serving config (deploy/config.py).

Secrets: nothing secret travels in the application's args or a runtime_env (both are shown by
the Ray dashboard and Serve's config): the gateway reads $MOE_SERVE_API_KEY from the
environment of the process it runs in (the pod's, from a Secret, on Kubernetes).

Logging: no deployment writes Serve's access log (the replicas' stats reports and the health
checks would flood it); the Gateway writes one line per user request instead
(deploy/access_log.py). Serve's own logs are at `log_level` (WARNING by default)."""

from __future__ import annotations

import ray
from ray.serve import Application
from ray.serve.schema import LoggingConfig

from moe_serve.deploy.config import (
    API_KEY_ENV,
    ConfigFileError,
    ServeConfig,
    ServedModelConfig,
    parse_serve_config,
)
from moe_serve.deploy.gateway import Gateway
from moe_serve.deploy.metrics import MetricsHub
from moe_serve.deploy.model_replica import ModelReplica
from moe_serve.deploy.validate import ModelCheckError, check_models

APP_NAME = "moe-serve"
GRPC_SERVICERS = [
    "moe_serve.protos.moe_serving_pb2_grpc.add_MoEServingServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


def is_cuda(model: ServedModelConfig) -> bool:
    """`auto`: CUDA when the Ray cluster has GPUs now (set `device: cuda` on autoscaled GPU
    clusters whose GPU nodes may not exist yet)."""
    if model.device != "auto":
        return model.device == "cuda"
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def serve_logging(log_level: str) -> LoggingConfig:
    """Serve's logging for our deployments (and, from `moe-serve run`, its controller and
    proxies): `log_level`, and never Serve's access log."""
    return LoggingConfig(log_level=log_level.upper(), enable_access_log=False)


def model_deployment(model: ServedModelConfig, cuda: bool, logging: LoggingConfig):
    return ModelReplica.options(
        name=model.deployment_name,
        ray_actor_options={"num_cpus": 0},
        logging_config=logging,
        placement_group_bundles=model.gang_bundles(cuda),
        placement_group_strategy="STRICT_PACK" if cuda else "PACK",
        autoscaling_config=model.autoscaling.model_dump(exclude_none=True),  # NOTE: Serve's names
        max_ongoing_requests=model.max_num_seqs,
        max_queued_requests=model.max_queued_requests,
        health_check_period_s=10,
        health_check_timeout_s=60,
        graceful_shutdown_timeout_s=30,
    )


def build_app(args: dict | ServeConfig, log_level: str = "warning") -> Application:
    """The application for a serving config, once every model passed `check_models` (else
    ModelCheckError, one line per problem: nothing is deployed)."""
    config = args if isinstance(args, ServeConfig) else parse_serve_config(args, "application args")
    if config.api_key is not None:
        raise ConfigFileError(
            "application args: api_key: refused: the args are visible in the Serve config and "
            f"the Ray dashboard; set ${API_KEY_ENV} in the gateway's environment instead "
            "(Helm: auth.existingSecret)"
        )
    problems = check_models(config)
    if problems:
        raise ModelCheckError(problems)
    logging = serve_logging(log_level)
    hub = MetricsHub.options(logging_config=logging).bind()
    handles = {}
    for model in config.models:
        cuda = is_cuda(model)
        deployment = model_deployment(model, cuda, logging)
        handles[model.name] = deployment.bind(model.model_dump(), cuda, hub)
    gateway = Gateway.options(logging_config=logging)
    return gateway.bind(config.model_dump(), handles, hub)
