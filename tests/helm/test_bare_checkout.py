"""The chart tests pass from a bare checkout, with nothing beside it.

A fresh `git clone` holds only what git tracks: a test that reads data from outside the
repository (a sibling directory, say) passes here and fails there. So this copies the files a
commit of the working tree would hold (tracked plus untracked, not ignored, as `git add -A` sees
them) into a temporary directory with no siblings, and runs tests/helm there with this interpreter,
importing the copy's packages and tests rather than this checkout's (editable) ones: the copy's
folders are linked as `moe_serve.*` from a directory put first on its PYTHONPATH, as an install
would name them. The helm binary is linked from this checkout's .tools/, so the copy does not
fetch it again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helm.helm_tool import HELM, REPO

THIS = Path(__file__).resolve().relative_to(REPO).as_posix()
COPY_NAME = "moe-serve"
NAMESPACE = ".namespace"  # in the copy: moe_serve/{cluster,deploy,models,protos} -> the copy's
PACKAGES = ("cluster", "deploy", "models", "protos")
# NOTE: imported in the copy; each file must lie inside it, not in this checkout.
PROBE = """
import json, moe_serve.deploy as deploy, tests.helm.crd as crd, tests.helm.helm_tool as tool
print(json.dumps([deploy.__file__, crd.__file__, str(crd.CRD_DIR), str(tool.REPO)]))
"""


def checkout_files() -> list[str]:
    """Paths (relative to REPO) of the tracked and untracked-but-not-ignored files present."""
    command = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"{' '.join(command)}: {exc} (this test needs a git checkout)", pytrace=False)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stderr}"
    # NOTE: a tracked file deleted in the working tree is listed but would not be committed.
    return [name for name in result.stdout.split("\0") if name and (REPO / name).is_file()]


def copy_checkout(dest: Path, helm: Path) -> None:
    for name in checkout_files():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target, follow_symlinks=False)
    cached = dest / HELM.relative_to(REPO)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.symlink_to(helm)
    namespace = dest / NAMESPACE / "moe_serve"
    namespace.mkdir(parents=True)
    for package in PACKAGES:
        (namespace / package).symlink_to(dest / package, target_is_directory=True)


def run_in(copy: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{copy / NAMESPACE}:{copy}", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run(
        [sys.executable, *args], cwd=copy, env=env, capture_output=True, text=True, timeout=420
    )


def test_helm_tests_pass_in_a_bare_checkout(tmp_path, helm):
    copy = tmp_path.resolve() / COPY_NAME
    copy_checkout(copy, helm)
    assert [p.name for p in tmp_path.iterdir()] == [COPY_NAME], "the copy must have no siblings"
    assert (copy / THIS).is_file(), f"{THIS} is not in the copy: is it git-ignored?"

    probe = run_in(copy, "-c", PROBE)
    assert probe.returncode == 0, probe.stderr
    outside = [p for p in json.loads(probe.stdout) if not Path(p).resolve().is_relative_to(copy)]
    assert not outside, f"the copy imports or reads from outside itself: {outside}"

    # NOTE: --ignore: the copy has no .git, and the inner run must not start this test again.
    args = ["-m", "pytest", "tests/helm", "-q", "-p", "no:cacheprovider", f"--ignore={THIS}"]
    result = run_in(copy, *args)
    output = f"{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, f"tests/helm failed in a bare checkout:\n{output[-6000:]}"
    summary = output.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary), output[-6000:]
    assert not re.search(r"skipped|xfailed|deselected", summary), summary
