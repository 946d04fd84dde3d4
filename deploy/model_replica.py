"""ModelReplica: one Serve replica per gang (its engine actor in bundle 0, its expert shards in
bundles 1..N), autoscaled by Serve. A thin async front: the replica's engine runs in the
engine actor (see `cluster/replica_engine.py` for why)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from ray import serve

from moe_serve.cluster.outputs import RequestOutput
from moe_serve.cluster.params import SamplingParams
from moe_serve.cluster.ray_replica import create_ray_replica
from moe_serve.cluster.stats import ReplicaStats
from moe_serve.deploy.config import ServedModelConfig
from moe_serve.deploy.priority import yield_cpu_to_engines
from moe_serve.models.source import resolve_source

log = logging.getLogger(__name__)
STATS_PERIOD_S = 2.0


@serve.deployment
class ModelReplica:
    async def __init__(self, model: dict, is_cuda: bool, hub) -> None:
        yield_cpu_to_engines()  # NOTE: this front only; its engine actor is another process
        self.config = ServedModelConfig.model_validate(model)
        checkpoint = await asyncio.to_thread(
            resolve_source, self.config.source, self.config.revision
        )
        replica = self.config.replica_config(str(checkpoint))
        gpus, resources = (1 if is_cuda else 0), self.config.resources
        engine_options = {"num_cpus": resources.replica_cpus, "num_gpus": gpus}
        shard_options = {"num_cpus": resources.shard_cpus, "num_gpus": gpus, "num_threads": 1}
        self.front, _ = await asyncio.to_thread(
            create_ray_replica, replica, engine_options, shard_options, resources.torch_threads
        )
        self.hub, self.replica_id = hub, serve.get_replica_context().replica_id.unique_id
        self.stats: ReplicaStats | None = None  # the engine's latest (every STATS_PERIOD_S)
        self.front.start()
        self._reporter = asyncio.get_running_loop().create_task(self._report())

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, is_streamed: bool
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request (AsyncEngine.generate: one message per output ready, or two when
        not `is_streamed`); cancelling the call aborts it (its KV blocks are freed)."""
        outputs = self.front.generate(prompt_ids, params, request_id, is_streamed)
        async with contextlib.aclosing(outputs) as out:
            async for output in out:
                yield output

    async def check_health(self) -> None:
        """Serve's periodic check: raising makes Serve replace this replica (the whole gang).
        NOTE: from what the engine last reported, never a call to it: the engine actor is
        busy for as long as a shard rebuild takes."""
        if self.front.error is not None:
            raise RuntimeError(f"the engine actor failed: {self.front.error}")
        if self.stats is not None and self.stats.shards.has_given_up:
            raise RuntimeError(f"gave up on its expert shards: {self.stats.shards.shards_down}")

    async def actor_pids(self) -> dict:
        """The engine actor's and its shards' process ids (tests, debugging)."""
        return await self.front.handle.actor.pids.remote()

    async def _report(self) -> None:
        while True:
            if self.front.error is None:  # NOTE: a dead engine stops reporting: not ready
                try:
                    self.stats = await self.front.handle.stats()
                    await self.hub.report.remote(self.config.name, self.replica_id, self.stats)
                except Exception as exc:  # NOTE: metrics must never take serving down
                    log.warning("could not report engine stats: %s", exc)
            await asyncio.sleep(STATS_PERIOD_S)

    async def __del__(self) -> None:
        if hasattr(self, "_reporter"):  # NOTE: __init__ may have failed part way
            self._reporter.cancel()
            await self.front.shutdown()
