"""Strict validation of KubeRay resources against the CRDs' OpenAPI v3 schemas.

The CRDs (byte-exact copies of KubeRay's, in tests/data/kuberay/ with their provenance in its
README.md) declare no `additionalProperties: false`: the API server silently prunes unknown fields
unless the client asks for strict field validation. Here every object that declares `properties`
is closed, so a misspelt field is an error, as with `kubectl apply --validate=strict`.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml
from jsonschema import Draft7Validator

from tests.helm.helm_tool import REPO

CRD_DIR = REPO / "tests" / "data" / "kuberay"
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
PRESERVE = "x-kubernetes-preserve-unknown-fields"
INT_OR_STRING = "x-kubernetes-int-or-string"
SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf")

# NOTE: the CRDs declare metadata as a bare object; the API server checks it as ObjectMeta.
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def strict(node: dict) -> dict:
    """A copy of an OpenAPI schema node in which undeclared fields are errors."""
    out = dict(node)
    if "properties" in node:
        out["properties"] = {key: strict(child) for key, child in node["properties"].items()}
        if "additionalProperties" not in node and not node.get(PRESERVE):
            out["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(node["additionalProperties"])
    if isinstance(node.get("items"), dict):
        out["items"] = strict(node["items"])
    for key in SUBSCHEMA_LISTS:
        if key in node:
            out[key] = [strict(child) for child in node[key]]
    if node.get(INT_OR_STRING) and "type" not in node and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable"):
        del out["nullable"]
        return {"anyOf": [out, {"type": "null"}]}
    return out


@cache
def crd_schema(kind: str, version: str) -> dict:
    path = CRD_DIR / CRD_FILES[kind]
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    for served in crd["spec"]["versions"]:
        if served["name"] == version:
            schema = strict(served["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = OBJECT_META
            schema["required"] = sorted({*schema.get("required", ()), "apiVersion", "kind"})
            return schema
    raise KeyError(f"{path}: no version {version}")


@cache
def validator(kind: str, version: str) -> Draft7Validator:
    return Draft7Validator(crd_schema(kind, version))


def crd_errors(resource: dict) -> list[str]:
    """Every way `resource` (a RayService or RayCluster) breaks its CRD, as `path: message`."""
    group, _, version = resource["apiVersion"].partition("/")
    assert group == "ray.io", resource["apiVersion"]
    errors = validator(resource["kind"], version).iter_errors(resource)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '.'}: {e.message}" for e in errors)


def as_ray_cluster(ray_service: dict) -> dict:
    """The RayCluster that KubeRay creates from a RayService's rayClusterConfig."""
    return {
        "apiVersion": ray_service["apiVersion"],
        "kind": "RayCluster",
        "metadata": {"name": ray_service["metadata"]["name"]},
        "spec": ray_service["spec"]["rayClusterConfig"],
    }


def ray_resources(path: Path) -> list[dict]:
    """The RayService/RayCluster documents of a manifest file (skips Secrets and the like)."""
    docs = yaml.safe_load_all(path.read_text())
    return [doc for doc in docs if doc and doc.get("kind") in CRD_FILES]
