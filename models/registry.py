"""Architecture registry and the one entry point that builds a model from a checkpoint."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from moe_serve.models.base import MoeForCausalLM
from moe_serve.models.config import DTYPES, ConfigError, ModelConfig
from moe_serve.models.granitemoe import GraniteMoeForCausalLM
from moe_serve.models.jetmoe import JetMoeForCausalLM
from moe_serve.models.loader import CheckpointFiles, WeightLoadError, load_weights
from moe_serve.models.olmoe import OlmoeForCausalLM

ARCHITECTURES: dict[str, type[MoeForCausalLM]] = {
    cls.model_type: cls for cls in (OlmoeForCausalLM, JetMoeForCausalLM, GraniteMoeForCausalLM)
}


def model_class(hf: dict[str, Any]) -> type[MoeForCausalLM]:
    """The class for a config.json, as transformers maps it: by `model_type` (by the
    architecture name when there is none), with `architectures` as a case-blind cross-check."""
    names = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if model_type is None:
        by_name = {cls.architecture.lower(): cls for cls in ARCHITECTURES.values()}
        found = {by_name.get(str(name).lower()) for name in names}
        if len(found) != 1 or None in found:
            raise ConfigError(
                f"no model_type, and architectures {names} name none of "
                f"{sorted(c.architecture for c in ARCHITECTURES.values())}"
            )
        return found.pop()
    cls = ARCHITECTURES.get(model_type)
    if cls is None:
        raise ConfigError(
            f"model_type {model_type!r} is not supported; supported: {sorted(ARCHITECTURES)}"
        )
    wrong = [name for name in names if str(name).lower() != cls.architecture.lower()]
    if wrong:
        raise ConfigError(
            f"architectures {wrong} do not match model_type {model_type!r} ({cls.architecture})"
        )
    return cls


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def read_checkpoint_config(directory: str | Path) -> tuple[type[MoeForCausalLM], ModelConfig]:
    """The architecture class and normalized config of the checkpoint in `directory` (weights
    optional: a gateway reads only the metadata)."""
    directory = Path(directory)
    hf = read_json(directory / "config.json")
    if hf is None:
        raise ConfigError(f"{directory} has no config.json")
    cls = model_class(hf)
    files = _weight_files(directory)
    if hf.get("dtype") is None and hf.get("torch_dtype") is None:
        hf = hf | {"dtype": stored_dtype(files)}
    config = cls.config_from_hf(hf, read_json(directory / "generation_config.json"))
    if config.tie_word_embeddings and files is not None and "lm_head.weight" in files.key_files:
        # NOTE: as transformers 5 does: a stored lm_head is the output layer even if config.json
        # says tied (granite-3.0-1b-a400m-base); when it equals the embedding nothing changes.
        config = replace(config, tie_word_embeddings=False)
    return cls, config


def _weight_files(directory: Path) -> CheckpointFiles | None:
    try:
        return CheckpointFiles.open(directory)
    except WeightLoadError:
        return None


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def stored_dtype(files: CheckpointFiles | None) -> str:
    """The dtype of the first floating-point tensor stored (what transformers' `dtype="auto"`
    falls back to when config.json names none); float32 without weights."""
    for path, keys in files.by_file() if files is not None else ():
        with safe_open(path, "pt") as f:
            for key in keys:
                dtype = _SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
                if dtype is not None:
                    return dtype
    return "float32"


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
    layer_expert_ids: Sequence[Sequence[int]] | None = None,
    wanted: Callable[[str], bool] = lambda name: True,
) -> MoeForCausalLM:
    """Build the model on `meta`, then fill it from the checkpoint in `directory`.

    `expert_ids`: the experts to materialise (default all), or per layer `layer_expert_ids`
    (see `MoeForCausalLM`). `wanted`: which parameters to read
    (a shard reads only its experts; the others stay on `meta`).
    """
    cls, config = read_checkpoint_config(directory)
    with torch.device("meta"):
        model = cls(config, expert_ids, layer_expert_ids)
    load_weights(
        model,
        CheckpointFiles.open(directory),
        cls.name_map,
        dtype=resolve_dtype(dtype, config),
        device=device,
        wanted=wanted,
    )
    return model.eval()
