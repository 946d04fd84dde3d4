"""Model sources: local directories, and hub ids resolved by huggingface_hub (offline cache)."""

from __future__ import annotations

import pytest

from moe_serve.models.registry import load_model
from moe_serve.models.source import SourceError, resolve_source
from moe_serve.models.tiny import write_tiny

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _fake_hub_cache(cache, repo_id: str, checkpoint):
    """The on-disk layout huggingface_hub uses: models--org--name/{refs,snapshots}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for file in checkpoint.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


def test_local_directory_is_used_as_is(tmp_path):
    assert resolve_source(str(tmp_path)) == tmp_path
    with pytest.raises(ValueError, match="revision"):
        resolve_source(str(tmp_path), revision="main")


def test_hub_id_resolves_through_snapshot_download(tmp_path, monkeypatch):
    checkpoint = write_tiny("granitemoe", tmp_path / "tiny")
    cache = tmp_path / "hub"
    snapshot = _fake_hub_cache(cache, "acme/tiny-granite", checkpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    path = resolve_source("acme/tiny-granite", cache_dir=cache)
    assert path.resolve() == snapshot.resolve()
    assert load_model(path).config.architecture == "GraniteMoeForCausalLM"
    assert resolve_source("acme/tiny-granite", revision=REVISION, cache_dir=cache) == path


def test_missing_sources_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError, match="neither a directory nor a hub id"):
        resolve_source(str(tmp_path / "nope"))
    with pytest.raises(SourceError, match="cannot fetch 'acme/absent'"):
        resolve_source("acme/absent", cache_dir=tmp_path / "hub")


def test_tiny_sources_are_generated_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_SERVE_CACHE", str(tmp_path))
    path = resolve_source("tiny:jetmoe:3")
    assert path == tmp_path / "tiny" / "jetmoe-seed3"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_source("tiny:jetmoe:3") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert load_model(path).config.architecture == "JetMoeForCausalLM"
    with pytest.raises(SourceError, match="unknown tiny architecture"):
        resolve_source("tiny:mixtral")
    with pytest.raises(SourceError, match="bad tiny source"):
        resolve_source("tiny:olmoe:x")
