"""Which expert-parallel shard owns which expert."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

Strategy = Literal["contiguous", "round_robin"]


@dataclass(frozen=True)
class ExpertPlacement:
    """`num_experts` experts over `num_shards` shards (uneven splits allowed: the first
    `num_experts % num_shards` shards hold one more). The same experts on every MoE layer."""

    num_experts: int
    num_shards: int
    strategy: Strategy = "contiguous"

    def __post_init__(self) -> None:
        if not 1 <= self.num_shards <= self.num_experts:
            raise ValueError(
                f"expert_parallel_size must be between 1 and the number of experts "
                f"({self.num_experts}), got {self.num_shards}"
            )
        if self.strategy not in ("contiguous", "round_robin"):
            raise ValueError(f"unknown placement {self.strategy!r} (contiguous, round_robin)")

    @cached_property
    def shard_expert_ids(self) -> tuple[tuple[int, ...], ...]:
        if self.strategy == "round_robin":
            return tuple(
                tuple(range(s, self.num_experts, self.num_shards)) for s in range(self.num_shards)
            )
        base, extra = divmod(self.num_experts, self.num_shards)
        bounds = [0]
        for shard in range(self.num_shards):
            bounds.append(bounds[-1] + base + (shard < extra))
        return tuple(tuple(range(bounds[s], bounds[s + 1])) for s in range(self.num_shards))

    @cached_property
    def shard_of(self) -> tuple[int, ...]:
        """Owner shard of each expert id."""
        owner = [0] * self.num_experts
        for shard, expert_ids in enumerate(self.shard_expert_ids):
            for expert in expert_ids:
                owner[expert] = shard
        return tuple(owner)
