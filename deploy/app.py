"""The Serve application: a Gateway ingress in front of one ModelReplica deployment per model,
plus the metrics hub. `build_app` is the import path Serve config files use:
`import_path: deploy.app:build_app`, `args:` the serving config (deploy/config.py)."""

from __future__ import annotations

import os

import ray
from ray.serve import Application

from deploy.config import API_KEY_ENV, ModelConfig, ServeConfig, parse_config
from deploy.gateway import Gateway
from deploy.metrics import MetricsHub
from deploy.model_replica import ModelReplica, gang_bundles

APP_NAME = "moe-serve"
GRPC_SERVICERS = [
    "protos.moe_serving_pb2_grpc.add_MoEServingServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


def is_cuda(model: ModelConfig) -> bool:
    """`auto`: CUDA when the Ray cluster has GPUs now (set `device: cuda` on autoscaled GPU
    clusters whose GPU nodes may not exist yet)."""
    if model.device != "auto":
        return model.device == "cuda"
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def model_deployment(model: ModelConfig, cuda: bool):
    return ModelReplica.options(
        name=model.deployment_name,
        ray_actor_options={"num_cpus": 0},
        placement_group_bundles=gang_bundles(model, cuda),
        placement_group_strategy="STRICT_PACK" if cuda else "PACK",
        autoscaling_config=model.autoscaling.model_dump(exclude_none=True),  # NOTE: Serve's names
        max_ongoing_requests=model.max_num_seqs,
        max_queued_requests=model.max_queued_requests,
        health_check_period_s=10,
        health_check_timeout_s=60,
        graceful_shutdown_timeout_s=30,
    )


def build_app(args: dict | ServeConfig) -> Application:
    config = args if isinstance(args, ServeConfig) else parse_config(args, "application args")
    hub = MetricsHub.bind()
    handles = {}
    for model in config.models:
        cuda = is_cuda(model)
        handles[model.name] = model_deployment(model, cuda).bind(model.model_dump(), cuda, hub)
    return _gateway(config).bind(config.model_dump(), handles, hub)


def _gateway(config: ServeConfig):
    """The Gateway, given the builder's $MOE_SERVE_API_KEY: the replicas of a cluster joined
    with RAY_ADDRESS do not inherit the environment of the process that builds the app."""
    key = os.environ.get(API_KEY_ENV)
    if config.api_key is not None or not key:
        return Gateway
    return Gateway.options(
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": {API_KEY_ENV: key}}}
    )
