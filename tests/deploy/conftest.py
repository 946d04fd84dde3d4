"""One Serve application for the deploy tests: every architecture, EP=1 and EP=2 side by side,
an autoscaled model, a deliberately tight one and one that idles at zero replicas until asked
(on a checkpoint of its own, which the fault tests break), behind an API key."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from moe_serve.deploy.ingress import free_port
from tests.conftest import GATEWAY_API_KEY as API_KEY


@dataclass(frozen=True)
class Server:
    http: str  # base URL
    grpc: str  # host:port
    api_key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


WATCH_S = 10.0  # NOTE: a gRPC health Watch stream's lifetime (limits.max_health_watch_s)


def app_config(tiny_dirs, http_port: int, grpc_port: int, ondemand: Path) -> dict:
    small = {
        "device": "cpu",
        "max_model_len": 512,
        "resources": {"replica_cpus": 0.25, "shard_cpus": 0.25},
    }
    return {
        "http": {"host": "127.0.0.1", "port": http_port},
        "grpc": {"port": grpc_port},
        "limits": {
            "max_completion_tokens_per_request": 4096,
            "max_health_watches": 2,
            "max_health_watch_s": WATCH_S,
        },
        "models": [
            {"name": "olmoe", "source": str(tiny_dirs["olmoe"])} | small,
            {"name": "jetmoe", "source": str(tiny_dirs["jetmoe"]), "expert_parallel_size": 2}
            | small,
            {
                "name": "granite",
                "source": str(tiny_dirs["granitemoe"]),
                "expert_parallel_size": 2,
                "placement": "round_robin",
            }
            | small,
            {
                "name": "scaling",
                "source": str(tiny_dirs["granitemoe"]),
                "autoscaling": {
                    "min_replicas": 1,
                    "max_replicas": 2,
                    "target_ongoing_requests": 1,
                    "upscale_delay_s": 0,
                    "downscale_delay_s": 600,
                    "metrics_interval_s": 0.5,
                    "look_back_period_s": 2,
                },
            }
            | small,
            {
                "name": "tight",
                "source": str(tiny_dirs["olmoe"]),
                "max_num_seqs": 1,
                "max_queued_requests": 1,
            }
            | small,
            {
                "name": "ondemand",  # NOTE: costs nothing until a test asks for it
                "source": str(ondemand),
                "expert_parallel_size": 2,
                "max_rebuild_failures": 2,
                "rebuild_backoff_s": 1,
                "autoscaling": {
                    "min_replicas": 0,
                    "initial_replicas": 0,
                    "max_replicas": 1,
                    "metrics_interval_s": 0.5,
                },
            }
            | small,
        ],
    }


@pytest.fixture(scope="session")
def ondemand_checkpoint(tiny_dirs, tmp_path_factory) -> Path:
    """The checkpoint of model `ondemand`: a copy that tests may break (and must restore)."""
    return Path(shutil.copytree(tiny_dirs["olmoe"], tmp_path_factory.mktemp("ondemand") / "olmoe"))


@pytest.fixture(scope="session")
def server(ray_cluster, tiny_dirs, ondemand_checkpoint):
    from ray import serve
    from ray.serve.config import gRPCOptions

    from moe_serve.deploy.app import APP_NAME, GRPC_SERVICERS, build_app
    from moe_serve.deploy.config import parse_serve_config

    http_port, grpc_port = free_port(), free_port()
    config = parse_serve_config(app_config(tiny_dirs, http_port, grpc_port, ondemand_checkpoint))
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICERS),
    )
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    yield Server(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", API_KEY)
    serve.shutdown()
