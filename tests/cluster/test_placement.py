"""Expert placement: contiguous (uneven) and round-robin splits."""

from __future__ import annotations

import pytest

from moe_serve.cluster.placement import ExpertPlacement


def test_contiguous_uneven_split():
    placement = ExpertPlacement(12, 5)
    assert placement.shard_expert_ids == ((0, 1, 2), (3, 4, 5), (6, 7), (8, 9), (10, 11))
    assert placement.shard_of == (0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4)


def test_round_robin_split():
    placement = ExpertPlacement(8, 3, "round_robin")
    assert placement.shard_expert_ids == ((0, 3, 6), (1, 4, 7), (2, 5))
    assert placement.shard_of == (0, 1, 2, 0, 1, 2, 0, 1)


@pytest.mark.parametrize(("experts", "shards"), [(8, 1), (8, 8), (64, 7), (5, 2)])
def test_every_expert_has_exactly_one_owner(experts, shards):
    for strategy in ("contiguous", "round_robin"):
        placement = ExpertPlacement(experts, shards, strategy)
        owned = [e for ids in placement.shard_expert_ids for e in ids]
        assert sorted(owned) == list(range(experts))
        assert all(ids for ids in placement.shard_expert_ids)


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="between 1 and the number of experts"):
        ExpertPlacement(8, 9)
    with pytest.raises(ValueError, match="unknown placement"):
        ExpertPlacement(8, 2, "random")
