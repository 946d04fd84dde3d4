"""Session-wide fixtures: tiny checkpoints of every architecture."""

from __future__ import annotations

import pytest

from models.tiny import ARCHS, write_tiny


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """arch -> directory of a deterministic tiny checkpoint (hub format)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: write_tiny(arch, root / arch, seed=1) for arch in ARCHS}
