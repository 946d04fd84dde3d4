"""What `/health` and gRPC health answer: whether every model can serve, from the replicas'
periodic reports (MetricsHub) and, for models allowed to idle at zero replicas, Serve's own
view of their deployment.

A model is healthy when a replica of it reported in the last READY_WITHIN_S seconds with its
expert shards up, or when it is configured with `min_replicas: 0` and has no replica without
anything failing (idle: it starts on the next request). It is not when its replicas' shards are
down (degraded: the reason is said), when Serve reports its deployment unhealthy or failed, or
when a model that must keep a replica has none that reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_serve.deploy.config import ServedModelConfig

READY_WITHIN_S = 10.0  # NOTE: replicas report every 2 s
FAILING = ("UNHEALTHY", "DEPLOY_FAILED")  # Serve's DeploymentStatus values that mean failing


@dataclass
class Health:
    down: dict[str, str] = field(default_factory=dict)  # model -> why it cannot serve
    idle: list[str] = field(default_factory=list)  # models at zero replicas by configuration

    @property
    def is_ok(self) -> bool:
        return not self.down

    def message(self) -> str:
        return "models not ready: " + "; ".join(f"{m}: {why}" for m, why in self.down.items())


def needs_serve_status(models: list[ServedModelConfig], reports: dict[str, dict]) -> bool:
    """Whether a model that may idle at zero has no serving replica (Serve must be asked)."""
    return any(
        m.autoscaling.min_replicas == 0 and not reports.get(m.name, {}).get("ready") for m in models
    )


def assess(
    models: list[ServedModelConfig], reports: dict[str, dict], statuses: dict[str, tuple[str, str]]
) -> Health:
    """`reports`: MetricsHub.model_health; `statuses`: deployment name -> (Serve's status, its
    message), needed only when `needs_serve_status`."""
    health = Health()
    for model in models:
        report = reports.get(model.name, {"ready": 0, "degraded": {}})
        if report["ready"]:
            continue
        if report["degraded"]:
            health.down[model.name] = "; ".join(sorted(set(report["degraded"].values())))
        elif model.autoscaling.min_replicas > 0:
            health.down[model.name] = f"no replica reported in the last {READY_WITHIN_S:.0f}s"
        else:
            status, message = statuses.get(model.deployment_name, ("UNKNOWN", "not deployed"))
            if status in FAILING or status == "UNKNOWN":
                health.down[model.name] = f"Serve reports {status}: {message}".rstrip(": ")
            else:
                health.idle.append(model.name)
    return health
