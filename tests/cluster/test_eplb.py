"""EPLB's planner and its trigger, on loads written here (the engine and the shards under a
new layout are tested in test_ray_replica.py and test_local_replica.py)."""

from __future__ import annotations

import random

import pytest

from moe_serve.cluster.eplb import Balancer, EplbConfig, plan_layer, plan_layout
from moe_serve.cluster.placement import ExpertPlacement


def max_over_mean(shards, loads) -> float:
    """Worked out here: each expert's load split evenly over the shards holding it."""
    holders = {e: sum(e in ids for ids in shards) for e in range(len(loads))}
    per_shard = [sum(loads[e] / holders[e] for e in ids) for ids in shards]
    return max(per_shard) / (sum(per_shard) / len(per_shard))


def skewed(num_experts: int, seed: int) -> list[float]:
    """A few hot experts (one takes ~25% of the tokens), the rest long-tailed."""
    rng = random.Random(seed)
    loads = [rng.uniform(1, 10) for _ in range(num_experts)]
    loads[rng.randrange(num_experts)] = sum(loads) / 3
    loads[rng.randrange(num_experts)] *= 6
    return loads


@pytest.mark.parametrize(("num_experts", "num_shards"), [(8, 2), (32, 2), (32, 3), (64, 4)])
@pytest.mark.parametrize("seed", range(4))
def test_plans_balance_skewed_loads_to_the_goal(num_experts, num_shards, seed):
    loads = skewed(num_experts, seed)
    start = ExpertPlacement(num_experts, num_shards).shard_expert_ids
    shards = plan_layer(loads, num_shards, num_redundant=num_shards)
    assert max_over_mean(shards, loads) <= min(1.15, max_over_mean(start, loads))
    assert sorted({e for ids in shards for e in ids}) == list(range(num_experts))
    assert all(len(set(ids)) == len(ids) for ids in shards)  # no copy twice on one shard
    sizes = [len(ids) for ids in shards]
    assert sum(sizes) == num_experts + num_shards and max(sizes) - min(sizes) <= 1


def test_without_redundancy_every_expert_has_one_copy():
    shards = plan_layer(skewed(16, 0), 2, num_redundant=0)
    assert sorted(e for ids in shards for e in ids) == list(range(16))


def test_a_plan_per_layer():
    loads = [skewed(8, 0), list(reversed(skewed(8, 0)))]
    layout = plan_layout(loads, 2, 2)
    assert layout.num_layers == 2 and layout.layers[0] != layout.layers[1]


def counts(loads_per_window, num_layers=2):
    """Cumulative routed-token counts after each window, as the dispatcher keeps them."""
    total, out = [[0] * 8 for _ in range(num_layers)], []
    for loads in loads_per_window:
        total = [[t + int(x) for t, x in zip(row, loads, strict=True)] for row in total]
        out.append(total)
    return out


def test_balancer_off_static_and_periodic():
    start = ExpertPlacement(8, 2).layout(2)
    hot = [100, 1, 1, 1, 1, 1, 1, 1]
    windows = counts([hot, hot, list(reversed(hot))])
    off = Balancer(EplbConfig("off", window_steps=10), 2)
    assert not off.is_due(10_000)

    static = Balancer(EplbConfig("static", window_steps=10), 2)
    assert not static.is_due(9) and static.is_due(10)
    layout = static.plan(10, windows[0], start)
    assert layout is not None and sum(0 in ids for ids in layout.layers[0]) == 2  # 0 copied
    assert not static.is_due(10_000)  # once only

    periodic = Balancer(EplbConfig("periodic", window_steps=10), 2)
    first = periodic.plan(10, windows[0], start)
    assert first is not None
    assert periodic.is_due(20) and periodic.plan(20, windows[1], first) is None  # no gain
    # the next window's load is on expert 7 (its counts alone, not the cumulative ones)
    third = periodic.plan(30, windows[2], first)
    assert third is not None and sum(7 in ids for ids in third.layers[0]) == 2


def test_bad_eplb_settings_are_refused():
    with pytest.raises(ValueError, match="off, static or periodic"):
        EplbConfig("sometimes")
    with pytest.raises(ValueError, match="window_steps"):
        EplbConfig("periodic", window_steps=0)
