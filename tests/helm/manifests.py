"""Reading rendered manifests: the RayService, its pod templates and the Serve config."""

from __future__ import annotations

import yaml


def the(manifests: list[dict], kind: str) -> dict:
    """The single manifest of `kind`."""
    found = [doc for doc in manifests if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def cluster_spec(manifests: list[dict]) -> dict:
    return the(manifests, "RayService")["spec"]["rayClusterConfig"]


def pod_specs(manifests: list[dict]) -> dict[str, dict]:
    """group name ("head" or the worker group's) -> pod spec."""
    cluster = cluster_spec(manifests)
    specs = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    for group in cluster["workerGroupSpecs"]:
        specs[group["groupName"]] = group["template"]["spec"]
    return specs


def ray_containers(manifests: list[dict]) -> dict[str, dict]:
    """group name -> its Ray container (the first one: KubeRay's convention)."""
    return {name: spec["containers"][0] for name, spec in pod_specs(manifests).items()}


def serve_config(manifests: list[dict]) -> dict:
    text = the(manifests, "RayService")["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 must be a YAML string"
    return yaml.safe_load(text)


def env_of(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def ports_of(container: dict) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container.get("ports", [])}
