"""The chart lints, renders for every value set, and renders what KubeRay and the app accept."""

from __future__ import annotations

import pytest
import yaml

from moe_serve.deploy.config import API_KEY_ENV, parse_serve_config
from moe_serve.deploy.ingress import CLUSTER_ENV
from moe_serve.deploy.limits import LimitsConfig
from moe_serve.deploy.priority import WORKER_NICENESS, WORKER_NICENESS_ENV
from tests.helm.conftest import VALUE_SETS
from tests.helm.crd import as_ray_cluster, crd_errors
from tests.helm.helm_tool import CHART, render, run_helm
from tests.helm.manifests import env_of, ports_of, ray_containers, serve_config, the

pytestmark = pytest.mark.usefixtures("helm")

SERVICERS = [
    "moe_serve.protos.moe_serving_pb2_grpc.add_MoEServingServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_lint_strict(helm, name):
    args = ["lint", "--strict", str(CHART)]
    for path in VALUE_SETS[name]:
        args += ["--values", str(path)]
    result = run_helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_renders_one_rayservice(manifests):
    service = the(manifests, "RayService")
    assert service["apiVersion"] == "ray.io/v1"
    assert service["metadata"]["name"] == "moe-moe-serve"


def test_rayservice_matches_crd_strictly(manifests):
    service = the(manifests, "RayService")
    assert crd_errors(service) == []
    assert crd_errors(as_ray_cluster(service)) == []


def test_serve_config_is_one_app_with_valid_args(manifests):
    config = serve_config(manifests)
    (app,) = config["applications"]
    assert app["name"] == "moe-serve"
    assert app["route_prefix"] == "/"
    assert app["import_path"] == "moe_serve.deploy.app:build_app"
    parsed = parse_serve_config(app["args"], "serveConfigV2 args")
    assert parsed.api_key is None, f"the key comes from {API_KEY_ENV}, never from args"
    assert [m.name for m in parsed.models]


def test_ports_agree_everywhere(manifests):
    config = serve_config(manifests)
    args = config["applications"][0]["args"]
    http, grpc = config["http_options"], config["grpc_options"]
    assert http["host"] == "0.0.0.0"
    assert args["http"]["port"] == http["port"]
    assert args["grpc"]["port"] == grpc["port"]
    assert grpc["grpc_servicer_functions"] == SERVICERS
    for group, container in ray_containers(manifests).items():
        ports = ports_of(container)
        assert ports["serve"] == http["port"], group
        assert ports["serve-grpc"] == grpc["port"], group


def test_serve_service_exposes_http_and_grpc(manifests):
    config = serve_config(manifests)
    service = the(manifests, "RayService")["spec"]["serveService"]
    ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert service["metadata"]["name"] == "moe-moe-serve-serve-svc"
    assert ports["serve"]["port"] == config["http_options"]["port"]
    assert ports["serve-grpc"]["port"] == config["grpc_options"]["port"]
    assert ports["serve-grpc"]["appProtocol"] == "kubernetes.io/h2c"


def test_ports_follow_values(helm):
    manifests = render(sets=["serve.httpPort=8080", "serve.grpcPort=50051"])
    config = serve_config(manifests)
    assert config["http_options"]["port"] == 8080
    assert config["applications"][0]["args"]["grpc"]["port"] == 50051
    head = ray_containers(manifests)["head"]
    assert ports_of(head)["serve-grpc"] == 50051


EVERY_OPTION = {
    "imagePullSecrets": [{"name": "regcred"}],
    "ray": {"authOptions": {"mode": "token"}},
    "auth": {"existingSecret": "api"},
    "huggingface": {"existingSecret": "hf"},
    "modelCache": {"persistentVolumeClaim": {"enabled": True, "existingClaim": "shared"}},
    "extraEnv": [{"name": "LOG_LEVEL", "value": "debug"}],
    "extraVolumes": [{"name": "ckpt", "persistentVolumeClaim": {"claimName": "ckpt"}}],
    "extraVolumeMounts": [{"name": "ckpt", "mountPath": "/ckpt", "readOnly": True}],
    "service": {"type": "LoadBalancer", "annotations": {"a": "b"}, "labels": {"team": "ml"}},
    "head": {
        "podLabels": {"team": "ml"},
        "podAnnotations": {"note": "every option"},
        "livenessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 10},
    },
    "worker": {
        "readinessProbe": {"httpGet": {"path": "/-/healthz", "port": "serve"}},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a"]}]}
                    ]
                }
            }
        },
    },
}


@pytest.mark.parametrize("autoscaler", [True, False])
def test_every_option_still_matches_crd(tmp_path, autoscaler):
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump({**EVERY_OPTION, "autoscaler": {"enabled": autoscaler}}))
    service = the(render(values=[path]), "RayService")
    assert crd_errors(service) == []
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is autoscaler
    assert ("autoscalerOptions" in cluster) is autoscaler
    assert cluster["authOptions"] == {"mode": "token"}


def test_ray_workers_start_at_the_niceness_moe_serve_run_gives_them(helm):
    for group, container in ray_containers(render()).items():
        # NOTE: deploy/priority.py: the engine actors must not start below Ray's own processes
        assert env_of(container)[WORKER_NICENESS_ENV]["value"] == WORKER_NICENESS, group


def test_ray_pods_run_serve_with_the_ingress_moe_serve_run_gives_it(helm):
    for group, container in ray_containers(render()).items():
        env = env_of(container)
        assert {key: env[key]["value"] for key in CLUSTER_ENV} == CLUSTER_ENV, group


def test_limits_metrics_and_grpc_message_size_follow_values(helm):
    sets = [
        "serve.grpcMaxMessageBytes=1048576",
        "serve.limits.max_stop_strings=4",
        "serve.metrics.require_api_key=true",
    ]
    manifests = render(sets=sets)
    args = parse_serve_config(serve_config(manifests)["applications"][0]["args"])
    assert args.grpc.max_message_bytes == 1 << 20
    assert args.limits.max_stop_strings == 4 and args.metrics.require_api_key
    for group, container in ray_containers(manifests).items():
        # NOTE: Serve's gRPC proxy reads it when it starts, on whichever pod it runs
        assert env_of(container)["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"]["value"] == "1048576", group
    defaults = parse_serve_config(serve_config(render())["applications"][0]["args"])
    assert defaults.grpc.max_message_bytes == 4 << 20 and defaults.limits == LimitsConfig()
