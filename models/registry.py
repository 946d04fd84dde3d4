"""Architecture registry and the one entry point that builds a model from a checkpoint."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from models.base import MoeForCausalLM
from models.config import DTYPES, ConfigError, ModelConfig
from models.granitemoe import GraniteMoeForCausalLM
from models.jetmoe import JetMoeForCausalLM
from models.loader import CheckpointFiles, load_weights
from models.olmoe import OlmoeForCausalLM

ARCHITECTURES: dict[str, type[MoeForCausalLM]] = {
    cls.architecture: cls for cls in (OlmoeForCausalLM, JetMoeForCausalLM, GraniteMoeForCausalLM)
}


def model_class(hf: dict[str, Any]) -> type[MoeForCausalLM]:
    names = hf.get("architectures") or []
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise ConfigError(f"unsupported architectures {names}; supported: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[names[0]]


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def read_checkpoint_config(directory: str | Path) -> tuple[type[MoeForCausalLM], ModelConfig]:
    """The architecture class and normalized config of the checkpoint in `directory`."""
    directory = Path(directory)
    hf = read_json(directory / "config.json")
    if hf is None:
        raise ConfigError(f"{directory} has no config.json")
    cls = model_class(hf)
    return cls, cls.config_from_hf(hf, read_json(directory / "generation_config.json"))


def load_config(directory: str | Path) -> ModelConfig:
    """The normalized config of the checkpoint in `directory`."""
    return read_checkpoint_config(directory)[1]


def resolve_dtype(name: str | torch.dtype | None, config: ModelConfig) -> torch.dtype:
    """`auto`/None -> the checkpoint's dtype; otherwise one of float32/bfloat16/float16."""
    if isinstance(name, torch.dtype):
        return name
    name = config.dtype if name in (None, "auto") else name
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(
    directory: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    expert_ids: Sequence[int] | None = None,
    wanted: Callable[[str], bool] = lambda name: True,
) -> MoeForCausalLM:
    """Build the model on `meta`, then fill it from the checkpoint in `directory`.

    `expert_ids`: the experts to materialise (default all). `wanted`: which parameters to read
    (a shard reads only its experts; the others stay on `meta`).
    """
    cls, config = read_checkpoint_config(directory)
    with torch.device("meta"):
        model = cls(config, expert_ids)
    load_weights(
        model,
        CheckpointFiles.open(directory),
        cls.name_map,
        dtype=resolve_dtype(dtype, config),
        device=device,
        wanted=wanted,
        is_tied=config.tie_word_embeddings,
    )
    return model.eval()
