"""`moe-serve bench eplb`: a checkpoint with skewed routing (biased router weights), served at
EP = N with EPLB off and static, alternating: max/mean (token, expert) pairs per shard and the
decode step time over the same decode window after a warm-up that lets EPLB plan, then the
time to prefill a batch of long prompts (compute-bound experts) and its max/mean."""

from __future__ import annotations

import asyncio
import shutil
import time

import ray
import torch
from safetensors.torch import load_file, save_file

from moe_serve.cluster.engine_core import EngineConfig
from moe_serve.cluster.eplb import EplbConfig
from moe_serve.cluster.params import SamplingParams
from moe_serve.cluster.ray_replica import create_ray_replica
from moe_serve.cluster.replica_engine import ReplicaConfig
from moe_serve.deploy.bench.report import checkpoint as bench_checkpoint
from moe_serve.deploy.bench.step_bench import decode_window
from moe_serve.models.source import cache_dir

# NOTE: the bias needs a hidden dimension that is large and positive for every token: the
# embeddings' dimension 0 is set to 4 (the others are N(0, 1)), and the router rows of six
# experts (four of them on the first contiguous shard) get a weight on it. Measured on 8
# prompts of 64 random tokens: max/mean 1.11-1.49 per layer at EP = 2 (contiguous), the
# hottest expert 11-16% of the (token, expert) pairs (1/32 = 3% if even).
PREFILL_TOKENS = 256
HOT_EXPERTS, HOT_BIAS = (0, 1, 2, 3, 8, 12), (0.5, 0.4, 0.3, 0.25, 0.2, 0.15)


def skewed_checkpoint() -> str:
    """The benchmark checkpoint with biased router weights (written once, cached)."""
    path = cache_dir() / "bench" / "olmoe-512-skewed"
    if not (path / "model.safetensors").exists():
        shutil.copytree(bench_checkpoint(), path, dirs_exist_ok=True)
        tensors = load_file(path / "model.safetensors")
        tensors["model.embed_tokens.weight"][:, 0] = 4.0
        for key, tensor in tensors.items():
            if key.endswith(".mlp.gate.weight"):
                tensor[list(HOT_EXPERTS), 0] += torch.tensor(HOT_BIAS, dtype=tensor.dtype)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return str(path)


def max_over_mean(before: tuple, after: tuple) -> float:
    """From two [layer][shard] counters: the sum over layers of the busiest shard's pairs
    over the sum of the shards' mean (every layer waits for its busiest shard)."""
    rows = [
        [a - b for a, b in zip(ra, rb, strict=True)] for ra, rb in zip(after, before, strict=True)
    ]
    return sum(max(r) for r in rows) / sum(sum(r) / len(r) for r in rows)


async def _one(front, batch: int, output_tokens: int, warm_up_tokens: int, mode: str) -> dict:
    params = SamplingParams(max_tokens=warm_up_tokens, temperature=0.0, ignore_eos=True)

    async def drain(index: int) -> None:
        async for _ in front.generate([7 + index] * 8, params):
            pass

    await asyncio.gather(*(drain(i) for i in range(batch)))  # NOTE: EPLB plans in here
    seconds, before, after = await decode_window(front, batch, output_tokens)
    steps = after.core.num_steps - before.core.num_steps
    b, a = before.shards.dispatch, after.shards.dispatch
    prefill_s, prefill_balance = await _prefill(front, batch)
    return {
        "eplb": mode,
        "ms_per_step": 1000 * seconds / max(steps, 1),
        "max_over_mean": max_over_mean(b.shard_tokens, a.shard_tokens),
        "prefill_s": prefill_s,
        "prefill_max_over_mean": prefill_balance,
        "layouts_applied": a.num_layouts,
    }


async def _prefill(front, batch: int) -> tuple[float, float]:
    """Seconds to prefill `batch` prompts of PREFILL_TOKENS tokens at once (compute-bound
    expert matmuls, where the busiest shard sets the pace), and that window's max/mean."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    before = await front.handle.stats()
    started = time.perf_counter()

    async def one(index: int) -> None:
        prompt = [(index * 131 + 7 * t) % 50000 for t in range(PREFILL_TOKENS)]
        async for _ in front.generate(prompt, params):
            pass

    await asyncio.gather(*(one(i) for i in range(batch)))
    seconds, after = time.perf_counter() - started, await front.handle.stats()
    return seconds, max_over_mean(
        before.shards.dispatch.shard_tokens, after.shards.dispatch.shard_tokens
    )


def measure(
    checkpoint: str, ep: int, batch: int, output_tokens: int, rounds: int, shard_cpus: float
) -> list[dict]:
    """Rows of {eplb, ms_per_step, max_over_mean, layouts_applied}, off and static in turn."""
    if not ray.is_initialized():  # NOTE: logical CPUs: every shard gets a process on any box
        ray.init(num_cpus=max(16, 2 + ep), include_dashboard=False, logging_level="warning")
    warm_up = 24
    engine = EngineConfig(
        max_model_len=PREFILL_TOKENS + 8 + max(output_tokens, warm_up),
        max_num_seqs=batch,
        enable_prefix_caching=False,
    )

    async def run(mode: str) -> dict:
        config = ReplicaConfig(
            checkpoint,
            expert_parallel_size=ep,
            engine=engine,
            eplb=EplbConfig(mode, window_steps=warm_up - 4),
        )
        front, _ = create_ray_replica(config, {"num_cpus": 1}, {"num_cpus": shard_cpus})
        try:
            return await _one(front, batch, output_tokens, warm_up, mode)
        finally:
            await front.shutdown()

    return [asyncio.run(run(mode)) for _ in range(rounds) for mode in ("off", "static")]


def render(rows: list[dict]) -> str:
    lines = [
        f"{'eplb':>7} {'ms/step':>9} {'max/mean':>9} {'prefill s':>10} {'max/mean':>9} "
        f"{'layouts':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r['eplb']:>7} {r['ms_per_step']:>9.2f} {r['max_over_mean']:>9.3f} "
            f"{r['prefill_s']:>10.2f} {r['prefill_max_over_mean']:>9.3f} {r['layouts_applied']:>8}"
        )
    return "\n".join(lines)
