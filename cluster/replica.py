"""Assembling a replica: the asyncio front over an engine core, in-process or as a Ray actor."""

from __future__ import annotations

import ray

from moe_serve.cluster.actors import EngineActor, RayCore, in_gang
from moe_serve.cluster.async_engine import AsyncEngine, LocalCore
from moe_serve.cluster.core import EngineCore, ReplicaConfig
from moe_serve.cluster.launchers import ShardLauncher


def create_local_replica(
    config: ReplicaConfig, launcher: ShardLauncher | None = None
) -> tuple[AsyncEngine, EngineCore]:
    """Front and core in this process (the core on one worker thread)."""
    core = EngineCore(config, launcher)
    return AsyncEngine(LocalCore(core), core.engine.limits, config.idle_ping_s), core


def create_ray_replica(
    config: ReplicaConfig,
    engine_options: dict | None = None,
    shard_options: dict | None = None,
    engine_threads: int | None = None,
) -> tuple[AsyncEngine, object]:
    """Front here, core in an EngineActor. Inside a placement group (a Serve replica's gang)
    the engine actor takes bundle 0 and shard i bundle i + 1. `engine_threads`: torch threads
    of the engine actor (default: the node's cores)."""
    options = in_gang(dict(engine_options or {}), 0)
    actor = EngineActor.options(**options).remote(config, shard_options, engine_threads)
    try:
        limits = ray.get(actor.start.remote())  # NOTE: surfaces load errors here
    except BaseException:
        ray.kill(actor, no_restart=True)  # NOTE: its shard actors go with it
        raise
    return AsyncEngine(RayCore(actor), limits, config.idle_ping_s), actor
