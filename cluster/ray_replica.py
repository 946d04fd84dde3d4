"""A replica on Ray: its engine in an `EngineActor` (bundle 0 of the replica's gang), its
expert shards as `ExpertShardActor`s (bundles 1..N), and the front's handle on the engine actor."""

from __future__ import annotations

import logging
import os
import time

import ray
import torch
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from moe_serve.cluster.async_engine import AsyncEngine
from moe_serve.cluster.params import RequestLimits
from moe_serve.cluster.placement import ExpertLayout
from moe_serve.cluster.replica_engine import ReplicaConfig, ReplicaEngine, StepInput, StepOutput
from moe_serve.cluster.shard import ExpertShard
from moe_serve.cluster.shard_group import ShardLauncher, ShardSpec
from moe_serve.cluster.stats import ReplicaStats
from moe_serve.cluster.transport import CollectiveTransport, local_ip

log = logging.getLogger(__name__)


@ray.remote
class ExpertShardActor:
    """One expert shard in its own process (its own GPU on CUDA)."""

    def __init__(self, spec: ShardSpec, layout: ExpertLayout, index: int, num_threads: int) -> None:
        if spec.device == "cpu":
            torch.set_num_threads(num_threads)
        device = "cuda:0" if spec.device == "cuda" else "cpu"  # NOTE: Ray sets CUDA_VISIBLE_DEVICES
        self.spec = spec
        self.shard = ExpertShard(spec.checkpoint, layout, index, spec.dtype, device)

    def ready(self) -> dict:
        """After loading: the process id and the parameters held (only this shard's experts)."""
        return {"pid": os.getpid(), "parameters": self.shard.parameter_summary()}

    def serve(self, host: str, port: int, rank: int, world_size: int) -> int:
        """Join rank 0's group and serve until STOP; returns the steps served."""
        transport = CollectiveTransport.join(
            host, port, rank, world_size, self.shard.device, self.spec.timeout_s, local_ip()
        )
        return self.shard.serve(transport)


def in_gang(options: dict, bundle_index: int) -> dict:
    """`options` placed on bundle `bundle_index` of the current placement group (a Serve
    replica's gang), when there is one."""
    group = get_current_placement_group()
    if group is None:
        return options
    strategy = PlacementGroupSchedulingStrategy(
        placement_group=group, placement_group_bundle_index=bundle_index
    )
    return options | {"scheduling_strategy": strategy}


def _wait_ready(actors: list, timeout_s: float, resources: str) -> list[dict]:
    """Each shard's `ready()`. The first shard that fails to load fails the launch at once;
    every shard is killed when the launch fails."""
    refs = [actor.ready.remote() for actor in actors]
    deadline = time.monotonic() + timeout_s
    ready, pending = {}, list(refs)
    try:
        while pending:
            wait_s = max(0.0, min(30.0, deadline - time.monotonic()))
            done, pending = ray.wait(pending, num_returns=1, timeout=wait_s)
            for ref in done:
                ready[ref] = ray.get(ref)
            if pending and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{len(pending)} of {len(refs)} expert shards were not ready after "
                    f"{timeout_s:.0f}s (each asks for {resources}): not enough resources, "
                    "or loading is too slow"
                )
            if pending and not done:
                log.warning(
                    "%d of %d expert shards not ready yet (placement or loading)",
                    len(pending),
                    len(refs),
                )
    except BaseException:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        raise
    return [ready[ref] for ref in refs]


class RayShardLauncher(ShardLauncher):
    """Shards as Ray actors. Inside a placement group (a Serve replica's gang), shard i takes
    bundle `i + 1` (bundle 0 is the attention actor); otherwise Ray places them freely."""

    def __init__(self, num_cpus: float = 1.0, num_gpus: float = 0.0, num_threads: int = 1) -> None:
        self.num_cpus, self.num_gpus, self.num_threads = num_cpus, num_gpus, num_threads
        self.actors: list = []
        self.serving: list = []
        self.summaries: list[dict] = []
        self.pids: list[int] = []

    def _options(self, index: int) -> dict:
        options = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "max_restarts": 0}
        return in_gang(options, index + 1)

    def start(self, spec, layout, host, port):
        self.actors = [
            ExpertShardActor.options(**self._options(i)).remote(spec, layout, i, self.num_threads)
            for i in range(layout.num_shards)
        ]
        resources = f"{self.num_cpus} CPU, {self.num_gpus} GPU"
        try:
            ready = _wait_ready(self.actors, spec.load_timeout_s, resources)
        except BaseException:
            self.actors = []
            raise
        self.summaries = [r["parameters"] for r in ready]
        self.pids = [r["pid"] for r in ready]
        world_size = len(self.actors) + 1
        self.serving = [
            actor.serve.remote(host, port, rank, world_size)
            for rank, actor in enumerate(self.actors, start=1)
        ]

    def stop(self):
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors, self.serving, self.pids = [], [], []

    def parameter_summaries(self):
        return list(self.summaries)


# NOTE: an engine actor with expert shards waits while they compute; its idle OpenMP threads
# must sleep then, not spin on the cores the shards need (libgomp reads this at start, so it
# goes in the actor's environment). Measured on 2 cores, EP = 2, engine on 2 threads: decode
# step 98 -> 81 ms at batch 16 with it (1 thread: 81 ms), 128 -> 121 ms at batch 64 (1: 136).
# Without shards the engine's threads work back to back and spinning is cheaper: EP = 1 on 2
# threads went 54 -> 88 ms with it.
SHARD_ENGINE_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def default_engine_threads(expert_parallel_size: int = 1) -> int:
    """An engine actor's torch threads unless configured: all cores but one (the front, raylet
    and Serve need one); with expert shards, all cores (the attention phase has them to itself:
    the shards wait in their collectives then, and the engine's threads sleep during theirs)."""
    cores = os.cpu_count() or 1
    return cores if expert_parallel_size > 1 else max(1, cores - 1)


@ray.remote(max_restarts=0)
class EngineActor:
    """The router/attention actor of a replica: a ReplicaEngine on this process's main
    thread
    (a single-threaded actor), owning its expert shard actors (they die with it)."""

    def __init__(
        self,
        config: ReplicaConfig,
        shard_options: dict | None = None,
        num_threads: int | None = None,
    ) -> None:
        # NOTE: Ray sets OMP_NUM_THREADS to the actor's (often fractional -> 1) CPU count and
        # runs workers at nice 15. Default: `default_engine_threads`; measured on 2 cores at
        # EP = 1, 2 threads here made served steps 1.8x slower than 1.
        torch.set_num_threads(num_threads or default_engine_threads(config.expert_parallel_size))
        self.config, self.shard_options = config, shard_options or {}
        self.engine: ReplicaEngine | None = None

    def start(self) -> RequestLimits:
        """Load the model, start the shards; returns what requests may ask for.
        NOTE: not in __init__: blocking on child actors there has hung under load."""
        launcher = (
            RayShardLauncher(**self.shard_options) if self.config.expert_parallel_size > 1 else None
        )
        self.engine = ReplicaEngine(self.config, launcher)
        return self.engine.core.limits

    def step(self, message: StepInput) -> StepOutput:
        return self.engine.step(message)

    def idle(self) -> None:
        self.engine.idle()

    def stats(self) -> ReplicaStats:
        return self.engine.stats()

    def parameter_summaries(self) -> list[dict]:
        """Per shard: its parameters and shapes (tests and debugging)."""
        return self.engine.launcher.parameter_summaries() if self.engine.dispatcher else []

    def shard_pids(self) -> list[int]:
        return list(self.engine.launcher.pids) if self.engine.dispatcher else []

    def pids(self) -> dict:
        """This actor's process id and its shards' (tests: kill one to see what recovers)."""
        return {"engine": os.getpid(), "shards": self.shard_pids()}

    def shard_handles(self) -> list:
        """The shard actors (tests: `ray.kill` one to see the replica recover)."""
        return list(self.engine.launcher.actors) if self.engine.dispatcher else []

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()


class RayEngineHandle:
    """The front's handle on an EngineActor."""

    def __init__(self, actor) -> None:
        self.actor = actor

    async def step(self, message: StepInput) -> StepOutput:
        return await self.actor.step.remote(message)

    async def idle(self) -> None:
        await self.actor.idle.remote()

    async def stats(self) -> ReplicaStats:
        return await self.actor.stats.remote()

    async def shutdown(self) -> None:
        try:
            await self.actor.shutdown.remote()
        finally:
            ray.kill(self.actor, no_restart=True)


def create_ray_replica(
    config: ReplicaConfig,
    engine_options: dict | None = None,
    shard_options: dict | None = None,
    engine_threads: int | None = None,
) -> tuple[AsyncEngine, object]:
    """Front here, engine in an EngineActor. Inside a placement group (a Serve replica's gang)
    the engine actor takes bundle 0 and shard i bundle i + 1. `engine_threads`: torch threads
    of the engine actor (default: the node's cores)."""
    options = in_gang(dict(engine_options or {}), 0)
    if config.expert_parallel_size > 1:
        runtime_env = dict(options.get("runtime_env") or {})
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **SHARD_ENGINE_ENV}
        options["runtime_env"] = runtime_env
    actor = EngineActor.options(**options).remote(config, shard_options, engine_threads)
    try:
        limits = ray.get(actor.start.remote())  # NOTE: surfaces load errors here
    except BaseException:
        ray.kill(actor, no_restart=True)  # NOTE: its shard actors go with it
        raise
    return AsyncEngine(RayEngineHandle(actor), limits, config.idle_ping_s), actor
