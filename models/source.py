"""Where a checkpoint comes from: a local directory or a Hugging Face hub id."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

TINY_PREFIX = "tiny:"


def cache_dir() -> Path:
    """Where generated checkpoints go: $MOE_SERVE_CACHE, else ~/.cache/moe-serve."""
    return Path(os.environ.get("MOE_SERVE_CACHE") or Path.home() / ".cache" / "moe-serve")


def tiny_checkpoint(arch: str, seed: int = 0) -> Path:
    """The tiny checkpoint of `arch`, written once to the cache (atomically: concurrent
    replicas on one node may race to create it)."""
    from moe_serve.models.tiny import ARCHS, write_tiny

    if arch not in ARCHS:
        raise SourceError(f"unknown tiny architecture {arch!r}; choose one of {ARCHS}")
    target = cache_dir() / "tiny" / f"{arch}-seed{seed}"
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{arch}-"))
    write_tiny(arch, staging, seed=seed)
    try:
        staging.rename(target)
    except OSError:  # NOTE: someone else finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


METADATA_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
# NOTE: only what serving reads; never optimizer states, pytorch_model.bin or original/ dumps.
CHECKPOINT_FILES = (
    *METADATA_FILES,
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
)


class SourceError(FileNotFoundError):
    """A model source that is neither a checkpoint directory nor a fetchable hub repository."""


def resolve_source(
    source: str,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    metadata_only: bool = False,
) -> Path:
    """A local checkpoint directory, downloading `source` from the hub if it is not one.

    `tiny:<arch>[:<seed>]` is a generated tiny checkpoint (the demo). `metadata_only`: only
    the config and tokenizer files (what a gateway needs), not the weights. Honours
    HF_HUB_OFFLINE / HF_HOME / HF_TOKEN like every hub client.
    """
    if source.startswith(TINY_PREFIX):
        arch, _, seed = source.removeprefix(TINY_PREFIX).partition(":")
        if not seed.isdigit() and seed:
            raise SourceError(f"bad tiny source {source!r}: expected tiny:<arch>[:<seed>]")
        return tiny_checkpoint(arch, int(seed or 0))
    path = Path(source).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision {revision!r} given for local directory {source!r}")
        return path
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise SourceError(
            f"model source {source!r} is neither a directory nor a hub id of the form org/name"
        )
    files = METADATA_FILES if metadata_only else CHECKPOINT_FILES
    try:
        return Path(
            snapshot_download(
                repo_id=source, revision=revision, cache_dir=cache_dir, allow_patterns=list(files)
            )
        )
    except (HfHubHTTPError, LocalEntryNotFoundError) as exc:
        raise SourceError(
            f"cannot fetch {source!r} (revision {revision or 'main'}) from the hub: {exc}"
        ) from exc
