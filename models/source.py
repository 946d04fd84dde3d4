"""Where a checkpoint comes from: a local directory or a Hugging Face hub id."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

# NOTE: only what serving reads; never optimizer states, pytorch_model.bin or original/ dumps.
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


class SourceError(FileNotFoundError):
    """A model source that is neither a checkpoint directory nor a fetchable hub repository."""


def resolve_source(
    source: str, revision: str | None = None, cache_dir: str | Path | None = None
) -> Path:
    """A local checkpoint directory, downloading `source` from the hub if it is not one.

    Honours HF_HUB_OFFLINE / HF_HOME / HF_TOKEN like every hub client.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision {revision!r} given for local directory {source!r}")
        return path
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise SourceError(
            f"model source {source!r} is neither a directory nor a hub id of the form org/name"
        )
    try:
        return Path(
            snapshot_download(
                repo_id=source,
                revision=revision,
                cache_dir=cache_dir,
                allow_patterns=list(CHECKPOINT_FILES),
            )
        )
    except (HfHubHTTPError, LocalEntryNotFoundError) as exc:
        raise SourceError(
            f"cannot fetch {source!r} (revision {revision or 'main'}) from the hub: {exc}"
        ) from exc
