"""A replica in this process: its engine on one worker thread behind the asyncio front, and
its expert shards (if any) as threads joined by gloo over loopback (tests, tools, debugging)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from moe_serve.cluster.async_engine import AsyncEngine
from moe_serve.cluster.replica_engine import ReplicaConfig, ReplicaEngine, StepInput, StepOutput
from moe_serve.cluster.shard import ExpertShard
from moe_serve.cluster.shard_group import ShardLauncher, serve_shard
from moe_serve.cluster.stats import ReplicaStats


class ThreadShardLauncher(ShardLauncher):
    """Shards as threads of this process (tests and debugging; gloo over loopback)."""

    def __init__(self) -> None:
        self.shards: list[ExpertShard] = []
        self.threads: list[threading.Thread] = []

    def start(self, spec, layout, host, port):
        self.shards = [
            ExpertShard(spec.checkpoint, layout, index, spec.dtype, spec.device)
            for index in range(layout.num_shards)
        ]
        world_size = len(self.shards) + 1
        for rank, shard in enumerate(self.shards, start=1):
            thread = threading.Thread(
                target=serve_shard,
                daemon=True,
                name=f"shard-{rank}",
                args=(shard, spec, host, port, rank, world_size),
            )
            thread.start()
            self.threads.append(thread)

    def stop(self):
        for thread in self.threads:
            thread.join(timeout=60)
        self.threads, self.shards = [], []

    def parameter_summaries(self):
        return [shard.parameter_summary() for shard in self.shards]


class LocalEngineHandle:
    """The front's handle on an in-process engine, run on one worker thread (tests, tools). On
    CPU, prefer the Ray actor: see the note in `cluster/replica_engine.py`."""

    def __init__(self, engine: ReplicaEngine) -> None:
        self.engine = engine
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="replica-engine")

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def step(self, message: StepInput) -> StepOutput:
        return await self._call(self.engine.step, message)

    async def idle(self) -> None:
        await self._call(self.engine.idle)

    async def stats(self) -> ReplicaStats:
        return await self._call(self.engine.stats)

    async def shutdown(self) -> None:
        await self._call(self.engine.shutdown)
        self.executor.shutdown(wait=False)


def create_local_replica(
    config: ReplicaConfig, launcher: ShardLauncher | None = None
) -> tuple[AsyncEngine, ReplicaEngine]:
    """Front and engine in this process (the engine on one worker thread)."""
    engine = ReplicaEngine(config, launcher)
    return AsyncEngine(LocalEngineHandle(engine), engine.core.limits, config.idle_ping_s), engine
