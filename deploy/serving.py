"""`moe-serve run`: start (or join) Ray, start Serve's HTTP and gRPC proxies, deploy the app,
print where it listens, block until SIGINT/SIGTERM, then shut everything down."""

from __future__ import annotations

import os
import signal
import threading
import time

import ray
from ray import serve
from ray.serve.config import gRPCOptions

from deploy.app import APP_NAME, GRPC_SERVICERS, build_app
from deploy.config import API_KEY_ENV, ServeConfig, parse_config
from deploy.model_replica import gang_bundles

DEMO_ARCHS = ("olmoe", "jetmoe", "granitemoe")


def demo_config() -> ServeConfig:
    """Three tiny models, one per architecture, each with two expert shards, on CPU."""
    return parse_config(
        {
            "models": [
                {
                    "name": f"tiny-{arch}",
                    "source": f"tiny:{arch}",
                    "device": "cpu",
                    "expert_parallel_size": 2,
                    "max_num_seqs": 32,
                    "resources": {"replica_cpus": 0.25, "shard_cpus": 0.25},
                }
                for arch in DEMO_ARCHS
            ]
        },
        "built-in demo",
    )


def logical_cpus(config: ServeConfig) -> int:
    """CPUs a local Ray needs to place every replica at max scale (fractions add up)."""
    needed = sum(
        sum(bundle["CPU"] for bundle in gang_bundles(m, False)) * m.autoscaling.max_replicas
        for m in config.models
    )
    return max(os.cpu_count() or 1, int(needed) + 2)


def start(config: ServeConfig) -> None:
    """Ray (joins RAY_ADDRESS if set), Serve with both proxies, the application."""
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"])
        else:
            ray.init(num_cpus=logical_cpus(config), include_dashboard=False)
    serve.start(
        http_options={"host": config.http.host, "port": config.http.port},
        grpc_options=gRPCOptions(port=config.grpc.port, grpc_servicer_functions=GRPC_SERVICERS),
    )
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")


def describe(config: ServeConfig) -> str:
    lines = [
        f"HTTP (OpenAI API)  http://{config.http.host}:{config.http.port}/v1",
        f"gRPC               0.0.0.0:{config.grpc.port} (moeserving.v1.MoEServing; Serve's gRPC"
        " proxy listens on every interface)",
        "API key            "
        + ("required" if config.resolved_api_key() else f"none (set api_key or ${API_KEY_ENV})"),
        "models:",
    ]
    lines += [
        f"  {m.name:<20} {m.source}  expert_parallel_size={m.expert_parallel_size}"
        for m in config.models
    ]
    return "\n".join(lines)


def _trap_signals(stop: threading.Event) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())


def run(config: ServeConfig | None) -> int:
    config = config or demo_config()
    stop = threading.Event()
    _trap_signals(stop)
    started = time.monotonic()
    try:
        start(config)
        _trap_signals(stop)  # NOTE: again: ray.init installs its own SIGTERM handler, which aborts
        print(f"ready in {time.monotonic() - started:.1f}s\n{describe(config)}", flush=True)
        stop.wait()
    finally:
        print("shutting down", flush=True)
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    return 0
