"""A replica on Ray, with expert parallelism over gloo: parity with EP=1, ownership, failures.

Each replica is what serving runs: an EngineActor (router/attention) owning its shard actors.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_serve.cluster.async_engine import EngineStepError
from moe_serve.cluster.engine_core import EngineConfig
from moe_serve.cluster.eplb import EplbConfig
from moe_serve.cluster.local_replica import create_local_replica
from moe_serve.cluster.overlap import OverlapConfig
from moe_serve.cluster.params import SamplingParams
from moe_serve.cluster.ray_replica import create_ray_replica
from moe_serve.cluster.replica_engine import ReplicaConfig
from moe_serve.cluster.stats import ShardGroupStats
from moe_serve.models.tiny import ARCHS
from tests.cluster.scoring import generate_scored, prompts

pytestmark = pytest.mark.slow
ENGINE = EngineConfig(max_model_len=512, block_size=8)
SHARDS = {"num_cpus": 0.5}


async def generate_all(front, batch, max_tokens: int = 24):
    async def one(prompt):
        tokens = []
        async for out in front.generate(
            prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        ):
            tokens.extend(out.deltas[0].token_ids)
        return tokens

    return await asyncio.gather(*(one(p) for p in batch), return_exceptions=True)


def run_ray_replica(config: ReplicaConfig, scenario):
    """Start a Ray replica, run `scenario(front, actor)` in one event loop, shut down."""

    async def main():
        front, actor = create_ray_replica(config, {"num_cpus": 0.5}, SHARDS)
        try:
            return await scenario(front, actor)
        finally:
            await front.shutdown()

    return asyncio.run(main())


@pytest.fixture(scope="module", params=ARCHS)
def reference(request, tiny_dirs):
    path = str(tiny_dirs[request.param])
    front, _ = create_local_replica(ReplicaConfig(path, engine=ENGINE))

    async def main():
        try:
            return await generate_scored(front, prompts())
        finally:
            await front.shutdown()

    return path, asyncio.run(main())


# NOTE: max_fixed_dispatch_tokens 0: every step in the exact mode (else the decode steps are
# fixed-capacity ones, and prompts of the test's length too). EPLB: "static" applies one new
# layout after 4 steps, "periodic" one every 4 steps (min_gain -1: whatever it gains), each
# with one redundant copy per shard, mid-run with requests in flight. Overlap "on": every step
# of two sequences or more runs as two micro-batches in ping-pong. Together, for each
# architecture: EP 2 and 3, overlap on and off, EPLB off, static and periodic, both dispatch
# modes (a case costs ~9 s, nearly all of it starting the replica's processes). EP 2 with
# EPLB and overlap off is how serving runs by default: test_hub_served checks it against
# transformers for every published config.
@pytest.mark.parametrize(
    ("ep", "max_fixed_dispatch_tokens", "eplb", "overlap"),
    [
        (3, 0, "static", "off"),
        (3, 0, "off", "on"),
        (2, 64, "periodic", "on"),
    ],
)
def test_expert_parallel_greedy_equals_ep1(
    reference, ray_cluster, ep, max_fixed_dispatch_tokens, eplb, overlap
):
    path, expected = reference
    config = ReplicaConfig(
        path,
        expert_parallel_size=ep,
        engine=ENGINE,
        collective_timeout_s=20,
        max_fixed_dispatch_tokens=max_fixed_dispatch_tokens,
        eplb=EplbConfig(eplb, window_steps=4, min_gain=-1.0),
        overlap=OverlapConfig(overlap, min_tokens=1),
    )

    async def scenario(front, actor):
        return await generate_scored(front, prompts()), await actor.stats.remote()

    outputs, stats = run_ray_replica(config, scenario)
    assert [tokens for tokens, _ in outputs] == [tokens for tokens, _ in expected]
    for (_, logprobs), (_, expected_logprobs) in zip(outputs, expected, strict=True):
        assert logprobs == pytest.approx(expected_logprobs, abs=1e-5)
    dispatch = stats.shards.dispatch
    num_steps = stats.core.num_steps
    assert dispatch.num_layouts == {"off": 0, "static": 1, "periodic": (num_steps - 1) // 4}[eplb]
    # nearly every step has two sequences or more (the 8 requests arrive at once)
    assert (dispatch.num_overlapped_steps >= num_steps // 2) == (overlap == "on")
    assert torch.tensor(dispatch.expert_tokens).sum() > 0
    assert dispatch.num_steps == stats.core.num_steps > 0  # one begin_step per forward pass
    assert (dispatch.num_fixed_steps > 0) == (max_fixed_dispatch_tokens > 0)
    if max_fixed_dispatch_tokens == 0:  # the minimum each way (tests/cluster/test_expert_parallel)
        assert dispatch.bytes_received * 2 == dispatch.min_bytes
    assert stats.shards.num_rebuilds == 0


def test_a_shard_holds_only_its_experts(tiny_dirs, ray_cluster):
    config = ReplicaConfig(
        str(tiny_dirs["jetmoe"]), expert_parallel_size=3, engine=ENGINE, placement="round_robin"
    )

    async def scenario(front, actor):
        return await actor.parameter_summaries.remote()

    summaries = run_ray_replica(config, scenario)
    owned = ((0, 3, 6), (1, 4, 7), (2, 5))  # round-robin over the tiny model's 8 experts
    for summary, expert_ids in zip(summaries, owned, strict=True):
        assert len(summary) == 2 * 2  # gate_up and down of each of the 2 layers, nothing else
        for name, shape in summary.items():
            assert name.endswith(("gate_up_proj", "down_proj")) and shape[0] == len(expert_ids)


def _still_running(pids: list[int], timeout_s: float = 30.0) -> list[int]:
    """The processes among `pids` still running after up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _is_running(pid)]
        time.sleep(0.1)
    return alive


def _is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def _failure_then_recovery(front, actor, break_shard, timeout_s: float):
    expected = await generate_all(front, prompts(4, seed=5))
    task = asyncio.ensure_future(generate_all(front, prompts(4, seed=1), max_tokens=480))
    await asyncio.sleep(1.0)
    started = time.monotonic()
    await break_shard()
    results = await task
    elapsed = time.monotonic() - started
    assert all(isinstance(r, EngineStepError) for r in results), results
    assert "expert shard" in str(results[0])
    assert elapsed < timeout_s + 5
    assert await generate_all(front, prompts(4, seed=5)) == expected
    stats = await actor.stats.remote()
    assert stats.shards.num_rebuilds == 1
    assert stats.core.num_free_blocks == stats.core.num_blocks


def test_killed_shard_fails_in_flight_requests_then_the_replica_recovers(tiny_dirs, ray_cluster):
    config = ReplicaConfig(
        str(tiny_dirs["granitemoe"]), expert_parallel_size=2, engine=ENGINE, collective_timeout_s=10
    )
    pids = []

    async def scenario(front, actor):
        pids.extend(await actor.shard_pids.remote())

        async def kill():
            ray_cluster.kill((await actor.shard_handles.remote())[0])

        await _failure_then_recovery(front, actor, kill, timeout_s=0)
        pids.extend(await actor.shard_pids.remote())

    run_ray_replica(config, scenario)
    assert len(set(pids)) == 4
    assert _still_running(pids) == [], "shard processes were left behind"


def test_hung_shard_times_out_then_the_replica_recovers(tiny_dirs, ray_cluster):
    config = ReplicaConfig(
        str(tiny_dirs["olmoe"]), expert_parallel_size=2, engine=ENGINE, collective_timeout_s=4
    )
    stopped = []

    async def scenario(front, actor):
        pid = (await actor.shard_pids.remote())[1]

        async def hang():
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)

        await _failure_then_recovery(front, actor, hang, timeout_s=4)

    try:
        run_ray_replica(config, scenario)
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):  # NOTE: the replica killed it
                os.kill(pid, signal.SIGKILL)


def test_idle_shards_outlive_the_collective_timeout(tiny_dirs, ray_cluster):
    config = ReplicaConfig(
        str(tiny_dirs["olmoe"]),
        expert_parallel_size=2,
        engine=ENGINE,
        collective_timeout_s=2,
        idle_ping_s=0.5,
    )

    async def scenario(front, actor):
        front.start()
        await asyncio.sleep(5)  # NOTE: the scenario is idleness itself: 2.5x the timeout
        outputs = await generate_all(front, prompts(2))
        return outputs, await actor.stats.remote()

    outputs, stats = run_ray_replica(config, scenario)
    assert all(len(o) == 24 for o in outputs) and stats.shards.num_rebuilds == 0


def _alive_actor_ids() -> set[str]:
    from ray._private.state import actors

    return {
        actor_id
        for actor_id, info in actors().items()
        if info["State"] != "DEAD" and info["ActorClassName"] in ("EngineActor", "ExpertShardActor")
    }


def test_a_shard_that_cannot_load_fails_the_replica_and_leaves_no_actor(
    tiny_dirs, ray_cluster, tmp_path
):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dirs["olmoe"], broken)
    tensors = load_file(broken / "model.safetensors")
    key = next(k for k in sorted(tensors) if ".mlp.experts." in k)  # NOTE: shards read it only
    tensors[key] = tensors[key][..., :-1].contiguous()
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    before = _alive_actor_ids()
    config = ReplicaConfig(str(broken), expert_parallel_size=2, engine=ENGINE)
    with pytest.raises(Exception, match=re.escape(key)):
        create_ray_replica(config, {"num_cpus": 0.5}, SHARDS)
    deadline = time.monotonic() + 30  # NOTE: ray.kill is asynchronous: wait for the GCS to see it
    while _alive_actor_ids() - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive_actor_ids() - before


async def _stats_when(actor, condition, timeout_s: float = 90) -> ShardGroupStats:
    deadline = time.monotonic() + timeout_s
    while not condition(stats := (await actor.stats.remote()).shards):
        assert time.monotonic() < deadline, stats
        await asyncio.sleep(0.2)
    return stats


async def _fails_fast(front) -> EngineStepError:
    started = time.monotonic()
    (result,) = await generate_all(front, prompts(1))
    assert isinstance(result, EngineStepError), result
    assert time.monotonic() - started < 2  # NOTE: no rebuild attempt to wait for
    return result


def test_failed_rebuilds_back_off_then_recover_or_give_up(tiny_dirs, ray_cluster, tmp_path):
    checkpoint = tmp_path / "olmoe"
    shutil.copytree(tiny_dirs["olmoe"], checkpoint)
    weights, hidden = checkpoint / "model.safetensors", tmp_path / "model.safetensors"
    config = ReplicaConfig(
        str(checkpoint),
        expert_parallel_size=2,
        engine=ENGINE,
        collective_timeout_s=10,
        max_rebuild_failures=2,
        rebuild_backoff_s=3,
    )

    async def kill_a_shard(actor):
        ray_cluster.kill((await actor.shard_handles.remote())[0])

    async def scenario(front, actor):
        expected = await generate_all(front, prompts(2))
        front.start()  # NOTE: its idle ticks find the dead shard and retry the rebuild
        weights.rename(hidden)  # NOTE: the shards of every rebuild fail to load
        await kill_a_shard(actor)
        stats = await _stats_when(actor, lambda s: s.num_rebuild_failures == 1)
        assert "rebuilding the expert shards failed (1 of 2)" in stats.shards_down
        assert not stats.has_given_up
        assert "retry shortly" in str(await _fails_fast(front))  # NOTE: backing off
        hidden.rename(weights)
        stats = await _stats_when(actor, lambda s: s.shards_down is None)
        assert stats.num_rebuilds == 1
        assert await generate_all(front, prompts(2)) == expected
        weights.rename(hidden)
        await kill_a_shard(actor)
        stats = await _stats_when(actor, lambda s: s.has_given_up)
        assert stats.num_rebuild_failures == 3  # NOTE: 1, then 2 in a row
        assert "is being replaced" in str(await _fails_fast(front))
        assert await actor.shard_pids.remote() == []  # NOTE: no shard left behind

    run_ray_replica(config, scenario)
