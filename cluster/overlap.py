"""When a step runs as two micro-batches in ping-pong (one's attention overlapping the other's
experts on the shards): it pays where the overlap hides more than the split costs (every
weight is read twice per step). That depends on the device and the batch, so "auto" measures
it: per bucket of step sizes, the first steps alternate between one batch and two
micro-batches, and the faster per token is kept, then measured again now and then."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Literal

OverlapMode = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class OverlapConfig:
    """off: never; on: every step of at least `min_tokens` tokens (and two sequences); auto:
    those steps too, where measured faster (see the module)."""

    mode: OverlapMode = "auto"
    min_tokens: int = 16  # smaller steps never split
    probe_steps: int = 4  # steps timed each way per bucket before choosing
    reprobe_steps: int = 2000  # chosen steps of a bucket before it is measured again

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "on", "off"):
            raise ValueError(f"micro-batch overlap must be auto, on or off, not {self.mode!r}")
        if self.min_tokens < 1 or self.probe_steps < 1 or self.reprobe_steps < 1:
            raise ValueError("overlap min_tokens, probe_steps and reprobe_steps must be >= 1")


@dataclass
class _Bucket:
    timings: dict[bool, list[float]] = field(default_factory=lambda: {False: [], True: []})
    choice: bool | None = None  # None while probing
    num_chosen: int = 0


class OverlapPolicy:
    """Pure Python: `choose` before a step, `record` its forward time after (auto only needs
    it while probing: `is_probing`)."""

    def __init__(self, config: OverlapConfig) -> None:
        self.config = config
        self.buckets: dict[int, _Bucket] = {}

    def _bucket(self, num_tokens: int) -> _Bucket:
        return self.buckets.setdefault(num_tokens.bit_length(), _Bucket())

    def choose(self, num_tokens: int) -> bool:
        """Split this step (of `num_tokens` tokens, two sequences at least) or not."""
        config = self.config
        if config.mode == "off" or num_tokens < config.min_tokens:
            return False
        if config.mode == "on":
            return True
        bucket = self._bucket(num_tokens)
        if bucket.choice is None:  # probing: alternate, the split second
            return len(bucket.timings[False]) > len(bucket.timings[True])
        bucket.num_chosen += 1
        if bucket.num_chosen >= config.reprobe_steps:
            self.buckets[num_tokens.bit_length()] = _Bucket()
        return bucket.choice

    def is_probing(self, num_tokens: int) -> bool:
        if self.config.mode != "auto" or num_tokens < self.config.min_tokens:
            return False
        return self._bucket(num_tokens).choice is None

    def record(self, num_tokens: int, is_split: bool, seconds: float) -> None:
        """A probed step's forward time; the bucket chooses once both ways have enough."""
        bucket = self._bucket(num_tokens)
        if bucket.choice is not None:
            return
        bucket.timings[is_split].append(seconds / num_tokens)
        if min(len(t) for t in bucket.timings.values()) >= self.config.probe_steps:
            split, whole = (statistics.median(bucket.timings[k]) for k in (True, False))
            bucket.choice = split < whole

    def summary(self) -> dict[int, bool | None]:
        """Per bucket (steps of 2^(b-1) to 2^b - 1 tokens): split, whole, or still probing."""
        return {b: bucket.choice for b, bucket in sorted(self.buckets.items())}
