"""Which expert-parallel shard holds which experts: the initial strategy (`ExpertPlacement`)
and the per-layer layout the dispatcher and the shards follow (`ExpertLayout`), which EPLB
(`cluster/eplb.py`) replaces on a live replica."""

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

    def layout(self, num_layers: int) -> ExpertLayout:
        """This placement on every one of `num_layers` MoE layers."""
        return ExpertLayout(self.num_experts, (self.shard_expert_ids,) * num_layers)


ShardExperts = tuple[tuple[int, ...], ...]  # [shard] -> the expert ids it holds


@dataclass(frozen=True)
class ExpertLayout:
    """`layers[l][s]`: the expert ids shard s holds on MoE layer l. Every expert is on at least
    one shard; one on several shards has redundant copies (EPLB), and each of its tokens goes
    to exactly one copy. A layer's copies are numbered shard after shard: its *slots*."""

    num_experts: int
    layers: tuple[ShardExperts, ...]

    def __post_init__(self) -> None:
        num_shards = {len(shards) for shards in self.layers}
        if len(num_shards) != 1:
            raise ValueError(f"every layer needs the same number of shards, got {num_shards}")
        for layer, shards in enumerate(self.layers):
            for shard, ids in enumerate(shards):
                if not ids or len(set(ids)) != len(ids):
                    raise ValueError(f"layer {layer} shard {shard}: {ids} is empty or repeats")
            held = {e for ids in shards for e in ids}
            if held != set(range(self.num_experts)):
                raise ValueError(
                    f"layer {layer}: experts {sorted(set(range(self.num_experts)) - held)} are "
                    f"on no shard, or ids outside [0, {self.num_experts}) are"
                )

    @property
    def num_shards(self) -> int:
        return len(self.layers[0])

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def shard_experts(self, shard: int) -> tuple[tuple[int, ...], ...]:
        """[layer] -> the expert ids `shard` holds there."""
        return tuple(shards[shard] for shards in self.layers)

    def slot_experts(self, layer: int, shard: int | None = None) -> list[int]:
        """[slot] -> its expert id, slots numbered shard after shard; given `shard`, -1 for
        the slots of the other shards."""
        return [
            e if shard in (None, s) else -1 for s, ids in enumerate(self.layers[layer]) for e in ids
        ]

    def slot_shards(self, layer: int) -> list[int]:
        return [s for s, ids in enumerate(self.layers[layer]) for _ in ids]

    def copies(self, layer: int) -> list[list[int]]:
        """[expert] -> the slots holding a copy of it."""
        slots: list[list[int]] = [[] for _ in range(self.num_experts)]
        for slot, expert in enumerate(self.slot_experts(layer)):
            slots[expert].append(slot)
        return slots

    def encode(self) -> list[int]:
        """Flat words (crosses a collective): per layer and shard, a count then the ids."""
        return [w for shards in self.layers for ids in shards for w in (len(ids), *ids)]

    @classmethod
    def decode(cls, words: list[int], num_experts: int, num_layers: int, num_shards: int):
        layers, at = [], 0
        for _ in range(num_layers):
            shards = []
            for _ in range(num_shards):
                count = words[at]
                shards.append(tuple(words[at + 1 : at + 1 + count]))
                at += 1 + count
            layers.append(tuple(shards))
        if at != len(words):
            raise ValueError(f"a layout of {len(words)} words has {len(words) - at} left over")
        return cls(num_experts, tuple(layers))
