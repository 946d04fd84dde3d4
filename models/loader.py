"""Strict safetensors loader: every parameter filled once, every checkpoint key accounted for.

Experts a model does not own are never read: per-expert tensors are skipped by name and
stacked `[E, ...]` tensors are read through `get_slice` for the owned rows only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from moe_serve.models.weights import Resolved, WeightNameMap

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class WeightLoadError(ValueError):
    """The checkpoint does not match the model (missing, unused or mis-shaped tensors)."""


@dataclass(frozen=True)
class CheckpointFiles:
    """The safetensors files of a checkpoint directory and which file holds each key."""

    directory: Path
    key_files: dict[str, str]

    @classmethod
    def open(cls, directory: str | Path) -> CheckpointFiles:
        directory = Path(directory)
        index = directory / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            for name in sorted(set(weight_map.values())):
                _check_index_file(directory / name, weight_map)
            return cls(directory, dict(weight_map))
        single = directory / SINGLE_FILE
        if not single.exists():
            raise WeightLoadError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        with safe_open(single, "pt") as f:
            return cls(directory, dict.fromkeys(f.keys(), SINGLE_FILE))

    def by_file(self) -> Iterator[tuple[Path, list[str]]]:
        files: dict[str, list[str]] = {}
        for key, name in self.key_files.items():
            files.setdefault(name, []).append(key)
        for name, keys in sorted(files.items()):
            yield self.directory / name, sorted(keys)


def _check_index_file(path: Path, weight_map: dict[str, str]) -> None:
    if not path.exists():
        raise WeightLoadError(f"{INDEX_FILE} names {path.name}, which does not exist")
    with safe_open(path, "pt") as f:
        actual = set(f.keys())
    listed = {k for k, v in weight_map.items() if v == path.name}
    if listed - actual:
        raise WeightLoadError(
            f"{path.name} lacks {sorted(listed - actual)[0]!r} listed in the index"
        )
    if actual - listed:
        raise WeightLoadError(
            f"{path.name} holds {sorted(actual - listed)[0]!r}, which the index does not list"
        )


class _Filler:
    """Materialises meta parameters and records which (part of which) parameter is filled."""

    def __init__(
        self,
        model: nn.Module,
        dtype: torch.dtype,
        device: torch.device | str,
        wanted: Callable[[str], bool],
    ) -> None:
        self.model, self.dtype, self.device = model, dtype, device
        self.params = dict(model.named_parameters())
        self.wanted = {name for name in self.params if wanted(name)}
        self.tensors: dict[str, torch.Tensor] = {}
        self.filled: set[tuple[str, int, int]] = set()  # (name, row, part); dense: row=part=-1

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            self.tensors[name] = torch.empty(
                self.params[name].shape, dtype=self.dtype, device=self.device
            )
        return self.tensors[name]

    def expected(self, parts: dict[str, tuple[int, ...]]) -> set[tuple[str, int, int]]:
        """Everything that must be filled; `parts`: expert parameter -> its parts."""
        out: set[tuple[str, int, int]] = set()
        for name in self.wanted:
            rule_parts = parts.get(name)
            if rule_parts is None:
                out.add((name, -1, -1))
            else:
                rows = self.params[name].shape[0]
                out.update((name, r, p) for r in range(rows) for p in rule_parts)
        return out

    def install(self) -> None:
        for name in self.wanted:
            self.tensor(name)  # NOTE: zero-row expert params (no experts owned) get a real tensor
        for name, tensor in self.tensors.items():
            module_name, _, attr = name.rpartition(".")
            module = self.model.get_submodule(module_name)
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


def load_weights(
    model: nn.Module,
    checkpoint: CheckpointFiles,
    name_map: WeightNameMap,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    wanted: Callable[[str], bool] = lambda name: True,
) -> None:
    """Fill `model`'s (meta) parameters from `checkpoint`.

    Only parameters for which `wanted(name)` holds are read; the others stay as they are.
    Expert parameters live in modules exposing `expert_ids` (the global id of each row).
    Raises WeightLoadError naming the key for missing, unused or mis-shaped tensors.
    """
    filler = _Filler(model, dtype, device, wanted)
    plan: dict[str, Resolved] = {}
    for key in checkpoint.key_files:
        resolved = name_map.resolve(key)
        if resolved.kind != "ignored" and resolved.target not in filler.params:
            raise WeightLoadError(
                f"checkpoint tensor {key!r} is unused: the model has no "
                f"parameter {resolved.target!r}"
            )
        plan[key] = resolved
    parts = _expert_parts(plan.values())
    _check_plan(plan, parts, model.config.num_experts)
    for path, keys in checkpoint.by_file():
        with safe_open(path, "pt") as f:
            for key in keys:
                resolved = plan[key]
                if resolved.kind == "ignored" or resolved.target not in filler.wanted:
                    continue
                if resolved.kind == "dense":
                    _load_dense(f, key, resolved.target, filler)
                else:
                    _load_experts(f, key, resolved, filler)
    missing = filler.expected(parts) - filler.filled
    if missing:
        name, row, part = sorted(missing)[0]
        where = "" if row < 0 else f" (row {row}, part {part})"
        raise WeightLoadError(
            f"parameter {name!r}{where} is missing from the checkpoint "
            f"({len(missing)} missing in all)"
        )
    filler.install()


def _expert_parts(plan) -> dict[str, tuple[int, ...]]:
    parts: dict[str, set[int]] = {}
    for resolved in plan:
        if resolved.kind == "expert":
            parts.setdefault(resolved.target, set()).update(range(resolved.rule.num_parts))
    return {name: tuple(sorted(p)) for name, p in parts.items()}


def _check_plan(
    plan: dict[str, Resolved], parts: dict[str, tuple[int, ...]], num_experts: int
) -> None:
    """Before any read: expert ids in range, and no two keys filling the same slot."""
    filled_by: dict[tuple[str, int, int], str] = {}
    for key, resolved in plan.items():
        target = resolved.target
        if resolved.kind == "dense":
            if target in parts:
                raise WeightLoadError(
                    f"checkpoint tensor {key!r} would fill the expert parameter {target!r} whole"
                )
            slots = [(target, -1, -1)]
        elif resolved.kind == "expert":
            experts = [resolved.expert] if resolved.expert is not None else range(num_experts)
            if not all(0 <= e < num_experts for e in experts):
                raise WeightLoadError(
                    f"checkpoint tensor {key!r} names expert {resolved.expert}; "
                    f"the model has {num_experts}"
                )
            slots = [(target, e, resolved.rule.part) for e in experts]
        else:
            continue
        for slot in slots:
            if slot in filled_by:
                raise WeightLoadError(
                    f"checkpoint tensors {filled_by[slot]!r} and {key!r} both fill {target!r}"
                )
            filled_by[slot] = key


def _check_float(key: str, dtype: str) -> None:
    if dtype not in ("F32", "BF16", "F16", "F64"):
        raise WeightLoadError(f"checkpoint tensor {key!r} has dtype {dtype}, expected a float")


def _load_dense(f, key: str, target: str, filler: _Filler) -> None:
    view = f.get_slice(key)
    _check_float(key, view.get_dtype())
    expected = tuple(filler.params[target].shape)
    if tuple(view.get_shape()) != expected:
        raise WeightLoadError(
            f"checkpoint tensor {key!r} has shape {tuple(view.get_shape())}, "
            f"expected {expected} for {target!r}"
        )
    filler.tensor(target).copy_(f.get_tensor(key))
    filler.filled.add((target, -1, -1))


def _load_experts(f, key: str, resolved: Resolved, filler: _Filler) -> None:
    target, rule = resolved.target, resolved.rule
    param = filler.params[target]
    owner = filler.model.get_submodule(target.rpartition(".")[0])
    row_of = {e: r for r, e in enumerate(owner.expert_ids)}
    part_rows = param.shape[1] // rule.num_parts
    part_shape = (part_rows, *param.shape[2:])
    rows = slice(rule.part * part_rows, (rule.part + 1) * part_rows)
    view = f.get_slice(key)
    _check_float(key, view.get_dtype())
    shape = tuple(view.get_shape())
    if not rule.is_stacked:
        if shape != part_shape:
            raise WeightLoadError(
                f"checkpoint tensor {key!r} has shape {shape}, expected {part_shape}"
            )
        if resolved.expert not in row_of:
            return  # NOTE: not owned here: never read
        row = row_of[resolved.expert]
        filler.tensor(target)[row, rows].copy_(f.get_tensor(key))
        filler.filled.add((target, row, rule.part))
        return
    num_experts = filler.model.config.num_experts
    if shape != (num_experts, *part_shape):
        raise WeightLoadError(
            f"checkpoint tensor {key!r} has shape {shape}, expected {(num_experts, *part_shape)}"
        )
    for start, stop in _runs(sorted(row_of)):
        block = view[start:stop]  # NOTE: reads only these experts' bytes
        for offset, expert in enumerate(range(start, stop)):
            filler.tensor(target)[row_of[expert], rows].copy_(block[offset])
            filler.filled.add((target, row_of[expert], rule.part))


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """Sorted ids -> half-open ranges of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for i in ids:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs
