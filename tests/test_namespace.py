"""The project installs as one namespace, `moe_serve.*`: no module imports the folders by their
bare names (which would load a second copy, or a user's own `models/`), and an installed
project works from a directory that has folders of those names."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FOLDERS = ("cluster", "deploy", "models", "protos")


def _bare_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        found += [
            f"{path.relative_to(REPO)}:{node.lineno} {n}"
            for n in names
            if n.split(".")[0] in FOLDERS
        ]
    return found


def test_no_module_imports_a_folder_by_its_bare_name():
    sources = [p for folder in (*FOLDERS, "tests") for p in (REPO / folder).rglob("*.py")]
    assert len(sources) > 100
    bare = [hit for path in sources for hit in _bare_imports(path)]
    assert not bare, "import these as moe_serve.<folder>:\n" + "\n".join(bare)


def test_a_users_own_folders_of_the_same_names_do_not_collide(tmp_path):
    for folder in FOLDERS:  # what an application or a Ray working_dir may well have
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("raise ImportError('the user package')\n")
    probe = (
        "import moe_serve.deploy.app, moe_serve.protos.moe_serving_pb2_grpc\n"
        "try:\n    import models\nexcept ImportError as exc:\n    print(exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "the user package"  # `models` is theirs, ours still loads
