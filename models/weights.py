"""Declarative maps from checkpoint tensor names to model parameter names."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Literal


@dataclass(frozen=True)
class ExpertTensor:
    """A checkpoint tensor holding expert weights of one MoE layer.

    `pattern` matches checkpoint keys with a named group `layer` and, when the checkpoint stores
    each expert separately, a group `expert`; without it, dim 0 of the tensor is the expert dim.
    The tensor fills part `part` of `num_parts` equal slices of the target's dim 1 (OLMoE's
    gate_proj and up_proj are the two halves of `gate_up_proj`).
    """

    pattern: str
    target: str  # formatted with `layer`
    part: int = 0
    num_parts: int = 1

    @cached_property
    def regex(self) -> re.Pattern[str]:
        return re.compile(self.pattern)

    @property
    def is_stacked(self) -> bool:
        return "(?P<expert>" not in self.pattern


@dataclass(frozen=True)
class Resolved:
    """What one checkpoint key is for."""

    kind: Literal["dense", "expert", "ignored"]
    target: str = ""
    rule: ExpertTensor | None = None
    expert: int | None = None  # per-expert tensors: the expert id; stacked: None


@dataclass(frozen=True)
class WeightNameMap:
    """Renames for dense tensors (regex, replacement; applied in order), expert tensor rules, and
    checkpoint artefacts to skip (e.g. rotary inv_freq buffers saved by old code)."""

    renames: tuple[tuple[str, str], ...] = ()
    experts: tuple[ExpertTensor, ...] = ()
    ignored: tuple[str, ...] = (r".*\.rotary_emb\.inv_freq",)

    def resolve(self, key: str) -> Resolved:
        if any(re.fullmatch(pattern, key) for pattern in self.ignored):
            return Resolved("ignored")
        for rule in self.experts:
            match = rule.regex.fullmatch(key)
            if match:
                expert = None if rule.is_stacked else int(match["expert"])
                return Resolved("expert", rule.target.format(layer=match["layer"]), rule, expert)
        target = key
        for pattern, replacement in self.renames:
            target = re.sub(pattern, replacement, target)
        return Resolved("dense", target)
