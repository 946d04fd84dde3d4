"""What the Ray pods get: GPUs, autoscaling, security, secrets, the model cache, probes."""

from __future__ import annotations

import json

import pytest
import yaml

from moe_serve.deploy.config import API_KEY_ENV
from tests.helm.helm_tool import render
from tests.helm.manifests import cluster_spec, env_of, pod_specs, ray_containers, serve_config, the

pytestmark = pytest.mark.usefixtures("helm")

GPU = "nvidia.com/gpu"


def _models(manifests):
    return serve_config(manifests)["applications"][0]["args"]["models"]


def test_head_has_no_gpu_and_no_replicas(manifests):
    head = cluster_spec(manifests)["headGroupSpec"]
    resources = head["template"]["spec"]["containers"][0]["resources"]
    assert GPU not in resources.get("limits", {})
    assert head["rayStartParams"]["num-cpus"] == "0"


def test_worker_group_is_autoscaled(manifests):
    cluster = cluster_spec(manifests)
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["securityContext"]["allowPrivilegeEscalation"] is False
    (group,) = cluster["workerGroupSpecs"]
    assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def _gang_gpus(model: dict) -> int:
    """GPUs of one CUDA replica: the engine actor's, plus one per shard when there are shards."""
    shards = model.get("expert_parallel_size", 1)
    return 1 if shards == 1 else shards + 1


def test_every_cuda_gang_fits_in_one_worker_pod(manifests):
    (group,) = cluster_spec(manifests)["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    cuda_models = [m for m in _models(manifests) if m.get("device") == "cuda"]
    for model in cuda_models:
        assert _gang_gpus(model) <= limits[GPU], model["name"]


def test_a_model_without_shards_needs_one_gpu(tmp_path):
    model = {"name": "m", "source": "s", "device": "cuda", "expert_parallel_size": 1}
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump({"serve": {"models": [model]}, "worker": {"gpus": 1}}))
    (group,) = cluster_spec(render(values=[path]))["workerGroupSpecs"]
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"][GPU] == 1


def test_gpu_example_serves_three_architectures_on_8_gpu_pods(rendered):
    manifests = rendered["gpu-three-models"]
    (group,) = cluster_spec(manifests)["workerGroupSpecs"]
    resources = group["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"][GPU] == resources["requests"][GPU] == 8
    models = _models(manifests)
    assert {m["source"] for m in models} == {
        "allenai/OLMoE-1B-7B-0924",
        "jetmoe/jetmoe-8b",
        "ibm-granite/granite-3.1-3b-a800m-instruct",
    }
    assert {m["device"] for m in models} == {"cuda"}
    assert len({m["expert_parallel_size"] for m in models}) == 3


def test_cpu_demo_has_no_gpus(rendered):
    manifests = rendered["cpu-demo"]
    for group, container in ray_containers(manifests).items():
        for amounts in container["resources"].values():
            assert GPU not in amounts, group
    models = _models(manifests)
    assert [m["source"] for m in models] == ["tiny:olmoe", "tiny:jetmoe", "tiny:granitemoe"]
    assert all(m["device"] == "cpu" and m["expert_parallel_size"] == 2 for m in models)


def test_pods_run_as_non_root(manifests):
    for group, spec in pod_specs(manifests).items():
        assert spec["securityContext"]["runAsNonRoot"] is True, group
        assert spec["securityContext"]["runAsUser"] == 1000, group
        context = spec["containers"][0]["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, group
        assert context["capabilities"]["drop"] == ["ALL"], group


def test_no_secrets_by_default(rendered):
    for group, container in ray_containers(rendered["default"]).items():
        env = env_of(container)
        assert "HF_TOKEN" not in env and API_KEY_ENV not in env, group


def test_secrets_come_from_existing_secrets():
    manifests = render(sets=["huggingface.existingSecret=hf", "auth.existingSecret=api"])
    for group, container in ray_containers(manifests).items():
        env = env_of(container)
        hf_token = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert hf_token == {"name": "hf", "key": "token", "optional": True}, group
        api_key = env[API_KEY_ENV]["valueFrom"]["secretKeyRef"]
        assert api_key == {"name": "api", "key": "api-key"}, group  # NOTE: never optional
    assert all(doc["kind"] != "Secret" for doc in manifests)
    # NOTE: the gateway reads the key from its pod's environment: nothing of it in the Serve
    # config (shown by the Ray dashboard), neither in the args nor as a runtime_env
    shown = json.dumps(serve_config(manifests))
    assert "api_key" not in shown and "runtime_env" not in shown and API_KEY_ENV not in shown


def _cache_volume(manifests, group):
    spec = pod_specs(manifests)[group]
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "model-cache"]
    env = env_of(spec["containers"][0])
    assert env["HF_HOME"]["value"] == mount["mountPath"]
    assert env["MOE_SERVE_CACHE"]["value"].startswith(mount["mountPath"] + "/")
    (volume,) = [v for v in spec["volumes"] if v["name"] == "model-cache"]
    return volume


def test_model_cache_is_an_empty_dir_by_default(rendered):
    manifests = rendered["default"]
    for group in pod_specs(manifests):
        assert "emptyDir" in _cache_volume(manifests, group)
    assert all(doc["kind"] != "PersistentVolumeClaim" for doc in manifests)


def test_model_cache_claim_is_created_and_shared(rendered):
    manifests = rendered["gpu-three-models"]
    claim = the(manifests, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "200Gi"
    for group in pod_specs(manifests):
        volume = _cache_volume(manifests, group)
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_model_cache_existing_claim_is_not_created():
    manifests = render(
        sets=[
            "modelCache.persistentVolumeClaim.enabled=true",
            "modelCache.persistentVolumeClaim.existingClaim=shared-hf",
        ]
    )
    assert all(doc["kind"] != "PersistentVolumeClaim" for doc in manifests)
    volume = _cache_volume(manifests, "head")
    assert volume["persistentVolumeClaim"]["claimName"] == "shared-hf"


def test_probes_are_left_to_kuberay_by_default(manifests):
    for group, container in ray_containers(manifests).items():
        assert "readinessProbe" not in container and "livenessProbe" not in container, group


def test_probes_can_be_set():
    manifests = render(
        sets=[
            "worker.readinessProbe.httpGet.path=/-/healthz",
            "worker.readinessProbe.httpGet.port=8000",
        ]
    )
    worker = ray_containers(manifests)["gpu-workers"]
    assert worker["readinessProbe"]["httpGet"] == {"path": "/-/healthz", "port": 8000}
    assert "readinessProbe" not in ray_containers(manifests)["head"]


@pytest.mark.parametrize("group", ["head", "worker"])
def test_scheduling_passthrough(group):
    manifests = render(
        sets=[
            f"{group}.nodeSelector.pool=serving",
            f"{group}.tolerations[0].key=dedicated",
            f"{group}.tolerations[0].operator=Exists",
            f"{group}.affinity.nodeAffinity.x=y",
            "imagePullSecrets[0].name=regcred",
        ]
    )
    name = "head" if group == "head" else "gpu-workers"
    spec = pod_specs(manifests)[name]
    assert spec["nodeSelector"] == {"pool": "serving"}
    assert spec["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
    assert spec["affinity"] == {"nodeAffinity": {"x": "y"}}
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]


def test_image_and_ray_start_params_as_strings():
    manifests = render(
        sets=[
            "image.repository=reg.example/moe-serve",
            "image.tag=1.2.3",
            "worker.rayStartParams.num-cpus=8",
        ]
    )
    for container in ray_containers(manifests).values():
        assert container["image"] == "reg.example/moe-serve:1.2.3"
    (group,) = cluster_spec(manifests)["workerGroupSpecs"]
    assert group["rayStartParams"] == {"num-cpus": "8"}
