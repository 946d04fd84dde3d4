"""The Dockerfile (it cannot be built here: no container engine) agrees with the project pins
and the chart, and its build context keeps what `pip install .` needs."""

from __future__ import annotations

import re
import tomllib

import yaml

from tests.helm.helm_tool import CHART, REPO


def _pins() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_base_image_ray_matches_constraints_and_chart():
    dockerfile = (REPO / "Dockerfile").read_text()
    (base,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, flags=re.M)
    ray = _pins()["ray"]
    assert base == f"rayproject/ray:{ray}-py311-gpu"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["ray"]["version"] == ray


def test_project_is_installed_with_its_constraints():
    dockerfile = (REPO / "Dockerfile").read_text()
    installs = re.findall(r"pip install [^\n]*", dockerfile)
    assert len(installs) == 2
    assert all("-c " in line and "constraints.txt" in line for line in installs)
    assert re.search(r"^USER 1000:100$", dockerfile, flags=re.M), "run as the non-root ray user"


def test_chart_app_version_is_the_project_version():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == _pyproject()["project"]["version"]


def test_build_context_keeps_what_pip_needs():
    ignored = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    project = _pyproject()
    package_dirs = project["tool"]["setuptools"]["package-dir"].values()
    packages = {directory.split("/")[0] for directory in package_dirs}
    needed = {"pyproject.toml", "constraints.txt", project["project"]["readme"], *packages}
    assert not needed & ignored
    assert {".git", ".venv", ".tools"} <= ignored
