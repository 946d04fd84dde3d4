"""Expert-parallel load balancing (EPLB): from the tokens each expert was routed, a layout
that evens the load across shards, with redundant copies of the hottest experts on other
shards (each copy then takes an equal share of its expert's tokens, see `Dispatcher`).

Pure Python: `plan_layout` plans, `Balancer` decides when (off, once, or every window).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from moe_serve.cluster.placement import ExpertLayout, ShardExperts

EplbMode = Literal["off", "static", "periodic"]


@dataclass(frozen=True)
class EplbConfig:
    """off: the start placement for good; static: one plan from the first window of steps,
    kept; periodic: a new plan from each window's loads (applied only if it helps)."""

    mode: EplbMode = "off"
    window_steps: int = 1000  # engine steps of routing counts behind a plan
    num_redundant_experts: int | None = None  # extra copies per layer; None: one per shard
    min_gain: float = 0.05  # apply a plan only if max/mean load drops by at least this much

    def __post_init__(self) -> None:
        if self.mode not in ("off", "static", "periodic"):
            raise ValueError(f"eplb mode must be off, static or periodic, not {self.mode!r}")
        if self.window_steps < 1 or (self.num_redundant_experts or 0) < 0:
            raise ValueError("eplb window_steps must be positive, num_redundant_experts >= 0")


def _replicate(loads: Sequence[float], num_shards: int, num_redundant: int) -> list[int]:
    """Copies per expert: each extra copy goes to the expert with the most load per copy."""
    copies = [1] * len(loads)
    for _ in range(num_redundant):
        candidates = [e for e in range(len(loads)) if copies[e] < num_shards]
        if not candidates:
            break
        hottest = max(candidates, key=lambda e: (loads[e] / copies[e], -e))
        copies[hottest] += 1
    return copies


def plan_layer(loads: Sequence[float], num_shards: int, num_redundant: int) -> ShardExperts:
    """One layer: replicate the hottest experts, then place copies heaviest first on the
    least-loaded shard that has a free slot and no copy of that expert yet. Slots per shard
    differ by at most one. A copy that fits nowhere is dropped (its expert keeps the others)."""
    copies = _replicate(loads, num_shards, num_redundant)
    num_slots = sum(copies)
    capacity = [num_slots // num_shards + (s < num_slots % num_shards) for s in range(num_shards)]
    items = sorted(
        ((loads[e] / copies[e], e) for e in range(len(loads)) for _ in range(copies[e])),
        key=lambda item: (-item[0], item[1]),
    )
    held: list[list[int]] = [[] for _ in range(num_shards)]
    shard_load = [0.0] * num_shards
    for load, expert in items:
        free = [
            s for s in range(num_shards) if len(held[s]) < capacity[s] and expert not in held[s]
        ]
        if not free:
            continue
        shard = min(free, key=lambda s: (shard_load[s], len(held[s]), s))
        held[shard].append(expert)
        shard_load[shard] += load
    return tuple(tuple(sorted(ids)) for ids in held)


def plan_layout(
    loads: Sequence[Sequence[float]], num_shards: int, num_redundant: int
) -> ExpertLayout:
    """loads [layer][expert] (tokens routed) -> a layout balancing every layer."""
    return ExpertLayout(
        len(loads[0]), tuple(plan_layer(layer, num_shards, num_redundant) for layer in loads)
    )


def shard_loads(layout: ExpertLayout, loads: Sequence[Sequence[float]]) -> list[list[float]]:
    """[layer][shard]: the load each shard takes under `layout`, each expert's tokens split
    evenly over its copies."""
    out = []
    for layer, shards in enumerate(layout.layers):
        copies = [len(c) for c in layout.copies(layer)]
        out.append([sum(loads[layer][e] / copies[e] for e in ids) for ids in shards])
    return out


def imbalance(layout: ExpertLayout, loads: Sequence[Sequence[float]]) -> float:
    """max/mean shard load, summed over layers (1.0: perfectly even; every layer waits for
    its busiest shard)."""
    per_layer = shard_loads(layout, loads)
    total = sum(sum(row) for row in per_layer)
    if total == 0:
        return 1.0
    return sum(max(row) for row in per_layer) * layout.num_shards / total


class Balancer:
    """Decides, between steps, whether a new layout is due: fed the engine's step count and
    the cumulative routed-token counts [layer][expert]; returns a layout to apply, or None."""

    def __init__(self, config: EplbConfig, num_shards: int) -> None:
        self.config, self.num_shards = config, num_shards
        self.num_redundant = (
            num_shards if config.num_redundant_experts is None else config.num_redundant_experts
        )
        self.window_start_step = 0
        self.window_start_counts: list[list[int]] | None = None
        self.num_plans = 0

    def is_due(self, num_steps: int) -> bool:
        if self.config.mode == "off" or (self.config.mode == "static" and self.num_plans):
            return False
        return num_steps - self.window_start_step >= self.config.window_steps

    def plan(
        self, num_steps: int, counts: Sequence[Sequence[int]], current: ExpertLayout
    ) -> ExpertLayout | None:
        """Call when `is_due`: a plan from this window's counts if it gains enough."""
        base = self.window_start_counts
        loads = [
            [c - (base[layer][e] if base else 0) for e, c in enumerate(row)]
            for layer, row in enumerate(counts)
        ]
        self.window_start_step, self.window_start_counts = num_steps, [list(r) for r in counts]
        layout = plan_layout(loads, self.num_shards, self.num_redundant)
        if self.config.mode == "static" or (
            imbalance(layout, loads) <= imbalance(current, loads) - self.config.min_gain
        ):
            self.num_plans += 1
            return layout
        return None
