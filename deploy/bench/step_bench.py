"""`moe-serve bench step`: decode step time against batch size for several EP sizes, and
the bytes dispatched per step against the minimum (tokens x distinct shards x H x bytes,
each way). Shards are Ray actors (Ray starts locally if needed)."""

from __future__ import annotations

import asyncio
import time

import ray

from moe_serve.cluster.async_engine import AsyncEngine
from moe_serve.cluster.engine_core import EngineConfig
from moe_serve.cluster.overlap import OverlapConfig
from moe_serve.cluster.params import SamplingParams
from moe_serve.cluster.ray_replica import create_ray_replica
from moe_serve.cluster.replica_engine import ReplicaConfig
from moe_serve.cluster.stats import ReplicaStats

WARM_UP_TOKENS = 16


async def decode_window(front: AsyncEngine, batch: int, output_tokens: int):
    """Seconds and engine steps from the moment every request has its first token to the end,
    and the dispatch counters over that window."""
    started: set[int] = set()
    marks: dict = {}

    async def one(index: int) -> None:
        params = SamplingParams(max_tokens=output_tokens, temperature=0.0, ignore_eos=True)
        async for _ in front.generate([1 + index % 50] * 8, params):
            if index not in started:
                started.add(index)
                if len(started) == batch:
                    marks["start"], marks["stats"] = time.perf_counter(), await front.handle.stats()

    await asyncio.gather(*(one(i) for i in range(batch)))
    seconds = time.perf_counter() - marks["start"]
    return seconds, marks["stats"], await front.handle.stats()


def _row(ep: int, batch: int, seconds: float, before: ReplicaStats, after: ReplicaStats) -> dict:
    steps = max(after.core.num_steps - before.core.num_steps, 1)
    moved = minimum = collectives = fixed = 0
    b, a = before.shards.dispatch, after.shards.dispatch
    if a is not None:
        moved = a.bytes_sent + a.bytes_received - b.bytes_sent - b.bytes_received
        minimum = a.min_bytes - b.min_bytes
        collectives = a.num_collectives - b.num_collectives
        fixed = a.num_fixed_steps - b.num_fixed_steps
    return {
        "ep": ep,
        "batch": batch,
        "ms_per_step": 1000 * seconds / steps,
        "bytes_per_step": moved / steps,
        "min_bytes_per_step": minimum / steps,
        "collectives_per_step": collectives / steps,
        "fixed_capacity_steps": fixed / steps,
    }


def measure(
    checkpoint: str,
    ep: int,
    batches: list[int],
    output_tokens: int,
    dtype: str | None,
    num_cpus_per_shard: float,
    max_fixed_dispatch_tokens: int = ReplicaConfig.max_fixed_dispatch_tokens,
    overlap: str = "auto",
) -> list[dict]:
    """Rows of {ep, batch, ms_per_step, bytes_per_step, min_bytes_per_step,
    collectives_per_step, fixed_capacity_steps (the share of steps)}."""
    if not ray.is_initialized():  # NOTE: logical CPUs: every shard gets a process on any box
        ray.init(num_cpus=max(16, 2 + ep), include_dashboard=False, logging_level="warning")
    engine = EngineConfig(max_model_len=8 + output_tokens, max_num_seqs=max(batches))
    config = ReplicaConfig(
        checkpoint,
        dtype=dtype,
        expert_parallel_size=ep,
        engine=engine,
        max_fixed_dispatch_tokens=max_fixed_dispatch_tokens,
        overlap=OverlapConfig(overlap),
    )

    async def run() -> list[dict]:
        front, _ = create_ray_replica(config, {"num_cpus": 1}, {"num_cpus": num_cpus_per_shard})
        try:
            rows = []
            for batch in batches:
                # NOTE: a warm-up at the same batch first: overlap "auto" times its first
                # steps of each size both ways (steady state is what is measured here)
                await decode_window(front, batch, WARM_UP_TOKENS)
                rows.append(_row(ep, batch, *await decode_window(front, batch, output_tokens)))
            return rows
        finally:
            await front.shutdown()

    return asyncio.run(run())
