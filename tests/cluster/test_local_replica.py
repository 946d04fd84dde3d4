"""A replica in this process: the asyncio front over a core on a worker thread, and expert
shards as threads."""

from __future__ import annotations

import asyncio

import pytest
import torch

from moe_serve.cluster.engine_core import EngineConfig
from moe_serve.cluster.local_replica import ThreadShardLauncher, create_local_replica
from moe_serve.cluster.params import RequestError
from moe_serve.cluster.placement import ExpertLayout
from moe_serve.cluster.replica_engine import ReplicaConfig
from moe_serve.models.registry import load_model
from tests.cluster.test_engine_core import greedy


def test_async_stream_and_abort_on_early_exit(tiny_dirs):
    config = ReplicaConfig(str(tiny_dirs["jetmoe"]), engine=EngineConfig(max_model_len=256))
    front, replica = create_local_replica(config)
    engine = replica.core

    async def scenario():
        pieces = [out async for out in front.generate([1, 2, 3], greedy(max_tokens=10))]
        assert pieces[-1].finished and sum(len(p.deltas[0].token_ids) for p in pieces) == 10
        stream = front.generate([4, 5, 6], greedy(max_tokens=200))
        await anext(stream)
        await stream.aclose()  # NOTE: the client went away
        done = [out async for out in front.generate([7], greedy(max_tokens=3))]
        assert done[-1].finished  # a later request got served after the abort took effect
        with pytest.raises(RequestError, match="empty"):
            await anext(front.generate([], greedy()))
        await front.shutdown()

    asyncio.run(scenario())
    assert not engine.has_unfinished
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.mark.slow
def test_attention_side_and_shards_split_the_weights(tiny_dirs):
    path = str(tiny_dirs["jetmoe"])
    full = load_model(path)
    front, replica = create_local_replica(
        ReplicaConfig(
            path, expert_parallel_size=3, engine=EngineConfig(max_model_len=512, block_size=8)
        ),
        ThreadShardLauncher(),
    )
    try:
        attention_side = dict(replica.core.model.named_parameters())
        assert not [n for n in attention_side if ".mlp.experts." in n]
        assert any(".self_attn.experts." in n for n in attention_side)  # MoA stays here
        for shard, expert_ids in zip(
            replica.launcher.shards, replica.placement.shard_expert_ids, strict=True
        ):
            for layer, experts in enumerate(shard.experts):
                whole = full.moe_blocks()[layer].experts
                assert torch.equal(experts.gate_up_proj, whole.gate_up_proj[list(expert_ids)])
                assert torch.equal(experts.down_proj, whole.down_proj[list(expert_ids)])
    finally:
        asyncio.run(front.shutdown())


# 8 experts on 2 shards, a different layout per layer, with copies (expert 0 on both shards of
# layer 0, experts 6 and 7 on both of layer 1): what an EPLB plan looks like
MOVED = (((0, 5, 6, 7), (0, 1, 2, 3, 4)), ((1, 6, 7), (0, 2, 3, 4, 5, 6, 7)))


@pytest.mark.slow
def test_a_new_layout_moves_the_live_shards_weights(tiny_dirs):
    path = str(tiny_dirs["olmoe"])
    full = load_model(path)
    front, replica = create_local_replica(
        ReplicaConfig(path, expert_parallel_size=2, engine=EngineConfig(max_model_len=512)),
        ThreadShardLauncher(),
    )
    try:
        assert full.config.num_layers == len(MOVED)
        # NOTE: on the engine's thread, between its steps and idle pings, as EPLB does
        move = front.handle.executor.submit(replica.shards.apply_layout, ExpertLayout(8, MOVED))
        move.result(timeout=60)
        assert replica.dispatcher.snapshot().num_layouts == 1
        for index, shard in enumerate(replica.launcher.shards):
            for layer, experts in enumerate(shard.experts):
                ids = list(MOVED[layer][index])
                assert experts.expert_ids == tuple(ids)
                whole = full.moe_blocks()[layer].experts
                assert torch.equal(experts.gate_up_proj, whole.gate_up_proj[ids])
                assert torch.equal(experts.down_proj, whole.down_proj[ids])
    finally:
        asyncio.run(front.shutdown())
