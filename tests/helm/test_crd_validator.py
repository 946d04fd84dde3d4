"""The strict CRD validator itself: known-good resources pass, and it can fail."""

from __future__ import annotations

import copy

import pytest

from tests.helm.crd import CRD_DIR, CRD_FILES, as_ray_cluster, crd_errors, ray_resources

# NOTE: named, not globbed: a missing tests/data/kuberay file must fail, never skip.
SAMPLES = [
    CRD_DIR / "sample-ray-service.llm-serve.yaml",
    CRD_DIR / "sample-ray-service.sample.yaml",
]


def test_kuberay_files_are_present():
    named = [CRD_DIR / name for name in CRD_FILES.values()] + SAMPLES + [CRD_DIR / "README.md"]
    missing = [p.name for p in named if not p.is_file()]
    assert not missing, f"KubeRay files missing from {CRD_DIR}: {missing}"


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_kuberay_samples_pass(path):
    resources = ray_resources(path)
    assert resources, f"{path.name}: no RayService or RayCluster"
    for resource in resources:
        assert crd_errors(resource) == []
        if resource["kind"] == "RayService":
            assert crd_errors(as_ray_cluster(resource)) == []


def _sample_service() -> dict:
    return ray_resources(CRD_DIR / "sample-ray-service.llm-serve.yaml")[0]


def _head(resource: dict) -> dict:
    return resource["spec"]["rayClusterConfig"]["headGroupSpec"]


def _head_container(resource: dict) -> dict:
    return _head(resource)["template"]["spec"]["containers"][0]


def _misspell_head_field(r):
    _head(r)["rayStartParam"] = _head(r).pop("rayStartParams")


def _misspell_container_field(r):
    _head_container(r)["imagePullPolcy"] = "Always"


def _number_in_ray_start_params(r):
    _head(r)["rayStartParams"]["num-cpus"] = 0


def _drop_required_group_name(r):
    del r["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]


def _float_quantity(r):
    _head_container(r)["resources"]["limits"]["cpu"] = 0.5


def _serve_config_as_map(r):
    r["spec"]["serveConfigV2"] = {"applications": []}


def _unknown_metadata_field(r):
    r["metadata"]["lables"] = {"a": "b"}


MUTATIONS = {
    "misspelt headGroupSpec field": (_misspell_head_field, "'rayStartParam' was unexpected"),
    "misspelt container field": (_misspell_container_field, "'imagePullPolcy' was unexpected"),
    "rayStartParams value not a string": (_number_in_ray_start_params, "is not of type 'string'"),
    "worker group without groupName": (_drop_required_group_name, "'groupName' is a required"),
    "decimal resource quantity": (_float_quantity, "is not valid under any of the given schemas"),
    "serveConfigV2 not a string": (_serve_config_as_map, "is not of type 'string'"),
    "misspelt metadata field": (_unknown_metadata_field, "'lables' was unexpected"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_broken_resources_fail(name):
    mutate, expected = MUTATIONS[name]
    resource = copy.deepcopy(_sample_service())
    mutate(resource)
    errors = crd_errors(resource)
    assert any(expected in error for error in errors), errors


def test_int_or_string_accepts_both():
    resource = copy.deepcopy(_sample_service())
    limits = _head_container(resource)["resources"]["limits"]
    limits["cpu"], limits["memory"] = 2, "5Gi"
    assert crd_errors(resource) == []
