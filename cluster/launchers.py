"""Starting and stopping one replica's expert shards: Ray actors, or threads in-process."""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moe_serve.cluster.shard import ExpertShard
from moe_serve.cluster.transport import CollectiveTransport, TransportError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSpec:
    """What every shard of a replica loads and how it joins the group."""

    checkpoint: str
    dtype: str | None
    device: str  # "cpu" or "cuda"
    timeout_s: float  # every collective, and joining the group
    load_timeout_s: float = 900.0  # loading the weights


class ShardLauncher(ABC):
    """Owns the shards of one replica (ranks 1..N of its group)."""

    @abstractmethod
    def start(
        self, spec: ShardSpec, shard_expert_ids: Sequence[tuple[int, ...]], host: str, port: int
    ) -> None:
        """Load the shards (errors surface here), then let them join the group at host:port
        and serve; returns without waiting for the join (rank 0 joins next)."""

    @abstractmethod
    def stop(self) -> None:
        """Tear every shard down (no process or thread left behind)."""

    @abstractmethod
    def parameter_summaries(self) -> list[dict[str, tuple[int, ...]]]:
        """Each shard's materialised parameters and their shapes."""


class ThreadShardLauncher(ShardLauncher):
    """Shards as threads of this process (tests and debugging; gloo over loopback)."""

    def __init__(self) -> None:
        self.shards: list[ExpertShard] = []
        self.threads: list[threading.Thread] = []

    def start(self, spec, shard_expert_ids, host, port):
        self.shards = [
            ExpertShard(spec.checkpoint, ids, spec.dtype, spec.device) for ids in shard_expert_ids
        ]
        world_size = len(self.shards) + 1
        for rank, shard in enumerate(self.shards, start=1):
            thread = threading.Thread(
                target=self._serve,
                daemon=True,
                name=f"shard-{rank}",
                args=(shard, spec, host, port, rank, world_size),
            )
            thread.start()
            self.threads.append(thread)

    def _serve(
        self, shard: ExpertShard, spec: ShardSpec, host: str, port: int, rank: int, world_size: int
    ) -> None:
        try:
            shard.serve(
                CollectiveTransport.join(
                    host, port, rank, world_size, torch.device(spec.device), spec.timeout_s, host
                )
            )
        except TransportError as exc:  # NOTE: rank 0 sees the failure too, and rebuilds
            log.warning("shard %d stopped: %s", rank, exc)

    def stop(self):
        for thread in self.threads:
            thread.join(timeout=60)
        self.threads, self.shards = [], []

    def parameter_summaries(self):
        return [shard.parameter_summary() for shard in self.shards]
