"""The README's module map names every module of the packages, and only modules that exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FOLDERS = ("models", "cluster", "deploy")


def _module_map() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Module map")
    return text[start : text.index("\n## ", start + 1)]


def test_the_module_map_names_every_module():
    section = _module_map()
    modules = [
        path
        for folder in FOLDERS
        for path in (REPO / folder).glob("*.py")
        if path.name not in ("__init__.py", "protogen.py")
    ]
    assert len(modules) > 40
    missing = [f"{p.parent.name}/{p.name}" for p in modules if f"`{p.name}`" not in section]
    assert not missing, f"the README's module map does not say what these are: {missing}"


def test_the_module_map_names_only_modules_that_exist():
    named = set(re.findall(r"`(?:[\w/<>]+/)?([\w]+\.py)`", _module_map()))
    existing = {p.name for folder in (*FOLDERS, "tests") for p in (REPO / folder).rglob("*.py")}
    assert named, "no module named"
    assert named <= existing | {"<arch>.py"}, sorted(named - existing)
