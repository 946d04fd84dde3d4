"""Greedy generations with their logprobs, through a replica's front (parity across EP sizes)."""

from __future__ import annotations

import asyncio
import random

from moe_serve.cluster.params import SamplingParams


def prompts(num: int = 8, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(500) for _ in range(rng.randint(1, 40))] for _ in range(num)]


async def generate_scored(front, batch, max_tokens: int = 24):
    """Greedy tokens and the sampled tokens' logprobs of each prompt."""

    async def one(prompt):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=0)
        tokens, logprobs = [], []
        async for out in front.generate(prompt, params):
            tokens.extend(out.deltas[0].token_ids)
            logprobs.extend(lp.logprob for lp in out.deltas[0].logprobs)
        return tokens, logprobs

    return await asyncio.gather(*(one(p) for p in batch))
