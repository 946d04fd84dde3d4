"""A reproducible request mix: prompt and output lengths drawn uniformly from ranges."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkItem:
    prompt_ids: list[int]
    max_tokens: int


@dataclass(frozen=True)
class Workload:
    num_requests: int = 48
    concurrency: int = 16
    prompt_len: tuple[int, int] = (8, 96)
    output_len: tuple[int, int] = (8, 96)
    seed: int = 0
    request_rate: float | None = None  # requests/s, Poisson; None: closed loop at concurrency

    def items(self, vocab_size: int) -> list[WorkItem]:
        """Random token-id prompts (ids below `vocab_size`) with their output lengths."""
        rng = random.Random(self.seed)
        return [
            WorkItem(
                [rng.randrange(vocab_size) for _ in range(rng.randint(*self.prompt_len))],
                rng.randint(*self.output_len),
            )
            for _ in range(self.num_requests)
        ]


def parse_range(text: str) -> tuple[int, int]:
    """'8-96' -> (8, 96); '32' -> (32, 32)."""
    low, _, high = text.partition("-")
    bounds = (int(low), int(high or low))
    if not 1 <= bounds[0] <= bounds[1]:
        raise ValueError(f"bad range {text!r}: expected LOW-HIGH with 1 <= LOW <= HIGH")
    return bounds
