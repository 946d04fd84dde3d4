"""The expert shards of one replica and their process group, over the replica's life: formed at
start, lost when a collective fails (the group is aborted and the shards stopped at once, so
the requests in flight fail without waiting for anything), rebuilt on the next step or idle
tick, with backoff after a failed rebuild, and given up after `max_rebuild_failures` failed
rebuilds in a row: the replica then reports itself unhealthy and Serve replaces the whole gang.
While the shards are down, new requests fail at once (503) instead of waiting for a rebuild.
Where the shards run (Ray actors, or threads) is up to the group's `ShardLauncher`.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from moe_serve.cluster.expert_parallel import Dispatcher, ShardFailure
from moe_serve.cluster.placement import ExpertLayout
from moe_serve.cluster.shard import ExpertShard
from moe_serve.cluster.stats import ShardGroupStats
from moe_serve.cluster.transport import (
    CollectiveTransport,
    Rendezvous,
    TransportError,
    local_ip,
)

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
    """Owns the shards of one replica (ranks 1..N of its group): Ray actors
    (`cluster/ray_replica.py`) or threads of this process (`cluster/local_replica.py`)."""

    @abstractmethod
    def start(self, spec: ShardSpec, layout: ExpertLayout, host: str, port: int) -> None:
        """Load the shards (shard i: its experts in `layout`; errors surface here), then let
        them join the group at host:port and serve; returns without waiting for the join
        (rank 0 joins next)."""

    @abstractmethod
    def stop(self) -> None:
        """Tear every shard down (no process or thread left behind)."""

    @abstractmethod
    def parameter_summaries(self) -> list[dict[str, tuple[int, ...]]]:
        """Each shard's materialised parameters and their shapes, as loaded at start."""


def serve_shard(
    shard: ExpertShard, spec: ShardSpec, host: str, port: int, rank: int, world_size: int
) -> None:
    """A launcher's shard (a thread or a process of its own): join rank 0's group at host:port
    and serve until STOP, or until the group fails (logged: rank 0 sees the failure too, and
    rebuilds); leave the group either way."""
    transport = None
    try:
        transport = CollectiveTransport.join(
            host, port, rank, world_size, shard.device, spec.timeout_s, host
        )
        shard.serve(transport)
    except TransportError as exc:
        log.warning("shard %d stopped: %s", rank, exc)
    finally:
        if transport is not None:
            transport.close()


@dataclass(frozen=True)
class RebuildPolicy:
    max_failures: int = 3  # failed rebuilds in a row before the replica gives up (unhealthy)
    backoff_s: float = 2.0  # wait after the first failed rebuild; doubles after each one


class ShardGroup:
    """Ranks 1..N (the shards) and rank 0's transport, both held by the dispatcher, whose
    layout the shards load (a rebuild included)."""

    def __init__(
        self,
        spec: ShardSpec,
        launcher: ShardLauncher,
        dispatcher: Dispatcher,
        device: torch.device,
        policy: RebuildPolicy,
    ) -> None:
        self.spec, self.launcher = spec, launcher
        self.dispatcher, self.device, self.policy = dispatcher, device, policy
        self.num_rebuilds = 0
        self.num_rebuild_failures = 0  # every failed rebuild (a counter for metrics)
        self.down_reason: str | None = None  # why the shards are down; None while they serve
        self.failures_in_a_row = 0
        self.next_attempt_at = 0.0  # time.monotonic() of the next rebuild attempt
        self.is_shut_down = False  # after `shutdown`: no ping, no rebuild, ever
        self.connect()

    @property
    def is_up(self) -> bool:
        return self.down_reason is None

    @property
    def has_given_up(self) -> bool:
        return self.failures_in_a_row >= self.policy.max_failures

    def connect(self) -> None:
        """Start the shards and form the group (raises if either fails; no shard is left)."""
        layout = self.dispatcher.layout
        host, world_size = local_ip(), layout.num_shards + 1
        timeout_s = self.spec.timeout_s
        rendezvous = Rendezvous(host, world_size, timeout_s)
        try:
            self.launcher.start(self.spec, layout, host, rendezvous.port)
            transport = CollectiveTransport.join(
                host, rendezvous.port, 0, world_size, self.device, timeout_s, host
            )
        except BaseException:
            self.launcher.stop()  # NOTE: no shard outlives a group that did not form
            raise
        finally:
            rendezvous.close()  # NOTE: formed (or failed): nothing listens any more
        self.dispatcher.attach(transport)

    def lose(self, error: BaseException) -> None:
        """A collective failed: abort the group and stop the shards now; rebuild later."""
        log.warning("expert shards lost, rebuilding: %s", error)
        self.down_reason = f"an expert shard failed ({error})"
        self.dispatcher.detach()
        self.launcher.stop()
        self.next_attempt_at = time.monotonic()

    def try_rebuild(self) -> None:
        """Rebuild if the shards are down and an attempt is due (never after giving up)."""
        if self.is_up or self.has_given_up or self.is_shut_down:
            return
        if time.monotonic() < self.next_attempt_at:
            return
        try:
            self.connect()
        except Exception as exc:
            self.failures_in_a_row += 1
            self.num_rebuild_failures += 1
            delay = self.policy.backoff_s * 2 ** (self.failures_in_a_row - 1)
            self.next_attempt_at = time.monotonic() + delay
            attempts = f"{self.failures_in_a_row} of {self.policy.max_failures}"
            self.down_reason = f"rebuilding the expert shards failed ({attempts}): {exc}"
            log.error("%s%s", self.down_reason, "" if self.has_given_up else f"; next in {delay}s")
            return
        self.down_reason, self.failures_in_a_row = None, 0
        self.num_rebuilds += 1

    def unavailable(self) -> str:
        """Why a new request cannot be served while the shards are down."""
        if self.has_given_up:
            return f"{self.down_reason}; this replica gave up and is being replaced"
        return f"the expert shards of this replica are down: {self.down_reason}; retry shortly"

    def apply_layout(self, layout: ExpertLayout) -> None:
        """Between steps, shards up: move to `layout` (raises ShardFailure if a shard fails)."""
        self.dispatcher.apply_layout(layout)

    def ping(self) -> None:
        """Keepalive while idle: a dead shard is found here (and the group lost)."""
        if not self.is_up or self.is_shut_down:
            return
        try:
            self.dispatcher.ping()
        except ShardFailure as exc:
            self.lose(exc)

    def stats(self) -> ShardGroupStats:
        return ShardGroupStats(
            self.num_rebuilds,
            self.num_rebuild_failures,
            self.down_reason,
            self.has_given_up,
            self.dispatcher.snapshot(),
        )

    def shutdown(self) -> None:
        """Tell the shards to stop and tear them down. For good: a call that reaches the
        replica after this one (an idle tick already on its way) must not start new shards."""
        self.is_shut_down = True
        self.down_reason = "the replica is shutting down"
        try:
            if self.dispatcher.transport is not None:
                self.dispatcher.stop()
        except Exception as exc:  # NOTE: shards already gone: nothing to tell them
            log.info("shards did not take STOP: %s", exc)
        self.dispatcher.detach()
        self.launcher.stop()
