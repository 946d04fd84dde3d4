"""Expert shards as processes of this machine (no Ray), on the device of `--device`: gloo on CPU,
NCCL on CUDA (several ranks on one GPU: see `rank_env`). Parity with EP = 1 on the same device,
and no host sync in the fixed-capacity dispatch."""

from __future__ import annotations

import asyncio

import pytest
import torch

from moe_serve.cluster.engine_core import EngineConfig
from moe_serve.cluster.eplb import EplbConfig
from moe_serve.cluster.local_replica import create_local_replica
from moe_serve.cluster.overlap import OverlapConfig
from moe_serve.cluster.params import SamplingParams
from moe_serve.cluster.process_shards import ProcessShardLauncher
from moe_serve.cluster.replica_engine import NewRequest, ReplicaConfig, StepInput
from tests.cluster.scoring import generate_scored, prompts
from tests.host_syncs import HostSyncs

pytestmark = pytest.mark.slow
ENGINE = EngineConfig(max_model_len=512, block_size=16)  # NOTE: flex on CUDA: a multiple of 16


def rank_env(device: torch.device):
    """NCCL refuses two ranks on one GPU of one host ("Duplicate GPU detected"); a host id of
    its own per process makes each rank a host of its own, joined by sockets over loopback:
    enough to check the NCCL code path on one GPU (not a way to serve). Nothing on CPU."""
    if device.type != "cuda":
        return lambda rank: {}
    return lambda rank: {"NCCL_HOSTID": f"moe-serve-rank-{rank}", "NCCL_SOCKET_IFNAME": "lo"}


@pytest.fixture
def shard_env(device, monkeypatch):
    """Each shard's environment; rank 0's (this process) set here."""
    env = rank_env(device)
    for name, value in env(0).items():
        monkeypatch.setenv(name, value)
    return env


def run_replica(config: ReplicaConfig, env, scenario):
    """A replica in this process, its shards (if any) in processes with `env` (`rank_env`):
    `scenario(front, engine)`."""
    launcher = ProcessShardLauncher(env) if config.expert_parallel_size > 1 else None
    front, engine = create_local_replica(config, launcher)

    async def main():
        try:
            return await scenario(front, engine)
        finally:
            await front.shutdown()

    return asyncio.run(main())


# NOTE: the first step (8 prompts, 160 tokens) dispatches in the exact mode, the decode steps in
# the fixed-capacity one; overlap "on" splits every step of two sequences or more; EPLB
# "periodic" applies a new layout (with a redundant copy per shard) every 4 steps, mid-run.
# One case per architecture: on CUDA, each runs the NCCL path end to end.
@pytest.mark.parametrize(
    ("arch", "ep", "overlap", "eplb"),
    [
        ("olmoe", 2, "on", "periodic"),
        ("jetmoe", 3, "off", "off"),
        ("granitemoe", 3, "on", "static"),
    ],
)
def test_process_shards_greedy_equals_ep1(tiny_dirs, device, shard_env, arch, ep, overlap, eplb):
    path = str(tiny_dirs[arch])
    score = lambda front, engine: generate_scored(front, prompts())  # noqa: E731
    expected = run_replica(ReplicaConfig(path, device=device.type, engine=ENGINE), None, score)
    config = ReplicaConfig(
        path,
        device=device.type,
        expert_parallel_size=ep,
        engine=ENGINE,
        collective_timeout_s=60,
        overlap=OverlapConfig(overlap, min_tokens=1),
        eplb=EplbConfig(eplb, window_steps=4, min_gain=-1.0),
    )

    async def scenario(front, engine):
        return await score(front, engine), engine.stats()

    outputs, stats = run_replica(config, shard_env, scenario)
    assert [tokens for tokens, _ in outputs] == [tokens for tokens, _ in expected]
    for (_, logprobs), (_, expected_logprobs) in zip(outputs, expected, strict=True):
        assert logprobs == pytest.approx(expected_logprobs, abs=1e-5)
    dispatch, num_steps = stats.shards.dispatch, stats.core.num_steps
    assert 0 < dispatch.num_fixed_steps < dispatch.num_steps == num_steps
    assert (dispatch.num_overlapped_steps >= num_steps // 2) == (overlap == "on")
    layouts = {"off": 0, "static": 1, "periodic": (num_steps - 1) // 4}[eplb]
    assert dispatch.num_layouts == layouts
    assert stats.shards.num_rebuilds == 0


# NOTE: JetMoE's attention experts run on the engine: in bfloat16 they group tokens with
# device offsets (no sync); in float32 with host counts (two syncs per layer, by design)
@pytest.mark.parametrize(
    ("arch", "dtype"), [("olmoe", None), ("granitemoe", None), ("jetmoe", "bfloat16")]
)
def test_decode_step_forward_has_no_host_sync(tiny_dirs, device, shard_env, arch, dtype):
    """The attention rank's whole forward pass watched (`tests/host_syncs.py`): embedding,
    rotary tables, every layer's attention, router and expert dispatch. None in decode
    (fixed-capacity) steps; the exact mode's `nonzero` per shard shows the watch sees them."""
    config = ReplicaConfig(
        str(tiny_dirs[arch]),
        dtype=dtype,
        device=device.type,
        expert_parallel_size=2,
        engine=ENGINE,
        overlap=OverlapConfig("off"),
    )
    seen: dict[bool, list[str]] = {True: [], False: []}  # is_fixed -> the syncs
    calls = {True: 0, False: 0}

    async def scenario(front, engine):
        model, dispatcher = engine.core.runner.model, engine.dispatcher
        forward = model.forward

        def watched(*args):
            with HostSyncs(device) as syncs:
                out = forward(*args)
            seen[dispatcher.is_fixed].extend(syncs.syncs)
            calls[dispatcher.is_fixed] += 1
            return out

        model.forward = watched
        return await generate_scored(front, prompts(), max_tokens=8)

    run_replica(config, shard_env, scenario)
    assert calls[True] > 0 and calls[False] > 0
    assert seen[True] == []
    assert "nonzero" in seen[False]


def test_no_shard_starts_after_shutdown(tiny_dirs, device, shard_env):
    """An idle tick or a step that reaches the engine after its shutdown (the driver's last
    call can land after it) must not find the shards "lost" and start new ones."""
    launcher = ProcessShardLauncher(shard_env)
    config = ReplicaConfig(
        str(tiny_dirs["olmoe"]), device=device.type, expert_parallel_size=2, engine=ENGINE
    )
    front, engine = create_local_replica(config, launcher)
    asyncio.run(front.shutdown())
    engine.idle()
    output = engine.step(StepInput([NewRequest("late", [1, 2, 3], SamplingParams(max_tokens=2))]))
    assert launcher.processes == []
    assert "shutting down" in output.failed["late"]
    assert engine.stats().shards.num_rebuilds == 0
