"""Checks on every model of a serving config before anything is deployed: its source resolves,
its config.json is readable and supported, its tokenizer loads, its expert parallelism fits the
checkpoint and (serving on this machine) its device fits the machine.

`moe-serve run` runs them before Ray starts; the Serve application builder runs them too (the
Helm path never runs the CLI). Each problem is one line naming the model, and the file and key
where there is one."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from moe_serve.deploy.config import ServeConfig, ServedModelConfig
from moe_serve.models.registry import read_checkpoint_config
from moe_serve.models.source import resolve_source
from moe_serve.models.tokenizer import TextTokenizer

# NOTE: where each architecture's config.json keeps its expert count (olmoe, granitemoe, jetmoe)
EXPERT_KEYS = ("num_experts", "num_local_experts", "moe_num_experts")
CONNECT_TIMEOUT_S = 3.0


class ModelCheckError(ValueError):
    """Models that cannot be served; the message has one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def check_models(config: ServeConfig, local_gpus: int | None = None) -> list[str]:
    """Every problem of every model (not just the first), one line each.

    `local_gpus`: the GPUs of this machine when Ray will run here (a private instance), so that
    a gang that cannot fit is reported now rather than waiting forever to be scheduled; None
    when the cluster's GPUs are elsewhere (joined with RAY_ADDRESS, or the Helm path).
    """
    return [problem for model in config.models for problem in check_model(model, local_gpus)]


def check_address(address: str) -> list[str]:
    """A cluster address of the form host:port must accept connections (else ray.init would
    retry for a minute). Other forms (ray://..., auto) are left to Ray."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return []
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        return [
            f"no Ray cluster answers at {address} (--address or $RAY_ADDRESS): {exc}; without "
            "either, moe-serve starts a Ray instance of its own"
        ]
    return []


def check_model(model: ServedModelConfig, local_gpus: int | None = None) -> list[str]:
    try:
        directory = resolve_source(model.source, model.revision, metadata_only=True)
    except (OSError, ValueError) as exc:
        problems = [str(exc)]
    else:
        problems = _checkpoint_problems(model, directory)
    if local_gpus is not None:
        problems += _device_problems(model, local_gpus)
    return [f"model {model.name!r}: {' '.join(problem.split())}" for problem in problems]


def _checkpoint_problems(model: ServedModelConfig, directory: Path) -> list[str]:
    path = directory / "config.json"
    if not path.is_file():
        return [f"{directory}: no config.json (not a checkpoint directory)"]
    try:
        _, checkpoint = read_checkpoint_config(directory)
    except KeyError as exc:
        return [f"{path}: missing key {exc}"]
    except (OSError, TypeError, ValueError) as exc:  # NOTE: ConfigError is a ValueError
        return [f"{path}: {exc}"]
    problems = []
    if model.expert_parallel_size > checkpoint.num_experts:
        problems.append(
            f"expert_parallel_size {model.expert_parallel_size} exceeds the model's "
            f"{checkpoint.num_experts} experts ({path}: {_expert_key(path)})"
        )
    return problems + _tokenizer_problems(directory)


def _tokenizer_problems(directory: Path) -> list[str]:
    if not (directory / "tokenizer.json").is_file():
        return [f"{directory}: no tokenizer.json"]
    try:
        TextTokenizer.from_dir(directory)
    except Exception as exc:  # NOTE: the tokenizers library raises plain Exceptions
        return [f"{directory}: tokenizer files: {exc}"]
    return []


def _expert_key(path: Path) -> str:
    hf = json.loads(path.read_text())
    present = [key for key in EXPERT_KEYS if hf.get(key) is not None]
    return present[0] if present else "number of experts (not set: the default)"


def _device_problems(model: ServedModelConfig, local_gpus: int) -> list[str]:
    if model.device != "cuda":
        return []
    needed = sum(bundle.get("GPU", 0) for bundle in model.gang_bundles(True))
    if needed <= local_gpus:
        return []
    return [
        f"device cuda with expert_parallel_size {model.expert_parallel_size} needs "
        f"{needed:.0f} GPUs per replica, and this machine has {local_gpus} (serve on a "
        "cluster with RAY_ADDRESS or --address, or set device: cpu)"
    ]
