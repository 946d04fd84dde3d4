"""What a replica reports about itself (to the metrics hub and its health check): frozen
dataclasses that cross Ray. NOTE: no torch or model imports here: the gateway and the metrics
hub unpickle these without loading the engine."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineStats:
    """An engine core's queues and KV cache now, and its counters since start."""

    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of KV blocks in use
    num_free_blocks: int
    num_blocks: int
    num_preemptions: int
    num_steps: int
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # prompt tokens served from the cache


@dataclass(frozen=True)
class DispatchStats:
    """What a replica's dispatcher moved since it started."""

    expert_tokens: tuple[tuple[int, ...], ...]  # [layer][expert]: tokens routed there
    bytes_sent: int  # payload rows to the shards
    bytes_received: int  # results back
    min_bytes: int  # tokens x distinct shards x H x bytes, both ways
    num_steps: int
    num_fixed_steps: int  # steps dispatched in fixed-capacity mode (no count exchange)
    num_collectives: int  # on the attention rank: step headers, pings and every layer's ones
    shard_tokens: tuple[tuple[int, ...], ...] = ()  # [layer][shard]: (token, expert) pairs
    num_layouts: int = 0  # new expert layouts applied on the live replica (EPLB)
    num_overlapped_steps: int = 0  # steps run as two micro-batches in ping-pong


@dataclass(frozen=True)
class ShardGroupStats:
    """A replica's expert shards; the defaults are a replica without any."""

    num_rebuilds: int = 0
    num_rebuild_failures: int = 0  # every failed rebuild, not only those in a row
    shards_down: str | None = None  # why the shards are down; None while they serve
    has_given_up: bool = False  # the replica is unhealthy (Serve replaces it)
    dispatch: DispatchStats | None = None


@dataclass(frozen=True)
class ReplicaStats:
    """What a replica reports (to metrics and its health check); crosses Ray."""

    core: EngineStats
    shards: ShardGroupStats = field(default_factory=ShardGroupStats)  # default: no shards
