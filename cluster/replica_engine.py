"""The engine of one replica: an `EngineCore` (dense model, KV cache, scheduler) and (for
expert_parallel_size > 1) the expert shards it drives over collectives, rebuilt when lost.

Driven one step at a time by messages (`StepInput` -> `StepOutput`) so that it can live in its
own Ray actor, whose methods run on the process's main thread.
NOTE: measured on CPU: MKL's small matmuls run 3-4x slower when called from any thread but
the main one, which makes a whole decode step ~2x slower; Serve runs user code off the main
thread, hence the separate actor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moe_serve.cluster.engine_core import EngineConfig, EngineCore
from moe_serve.cluster.eplb import Balancer, EplbConfig
from moe_serve.cluster.expert_parallel import Dispatcher, ShardFailure, install_expert_parallel
from moe_serve.cluster.outputs import RequestOutput
from moe_serve.cluster.overlap import OverlapConfig
from moe_serve.cluster.params import RequestError, SamplingParams
from moe_serve.cluster.placement import ExpertPlacement, Strategy
from moe_serve.cluster.shard import is_mlp_expert
from moe_serve.cluster.shard_group import (
    RebuildPolicy,
    ShardGroup,
    ShardLauncher,
    ShardSpec,
)
from moe_serve.cluster.stats import ReplicaStats
from moe_serve.models.registry import load_model
from moe_serve.models.tokenizer import TextTokenizer


@dataclass(frozen=True)
class ReplicaConfig:
    checkpoint: str  # a local checkpoint directory
    dtype: str | None = None  # None/"auto": the checkpoint's
    device: str = "auto"  # auto | cpu | cuda
    expert_parallel_size: int = 1
    placement: Strategy = "contiguous"
    engine: EngineConfig = field(default_factory=EngineConfig)
    collective_timeout_s: float = 30.0  # every collective, and the shards' join
    # steps of at most this many tokens dispatch in fixed-capacity mode (no count exchange, no
    # host sync per layer; see `Dispatcher`); 0: every step exact
    max_fixed_dispatch_tokens: int = 64
    eplb: EplbConfig = field(default_factory=EplbConfig)  # balancing the shards' load
    # steps run as two micro-batches, one's attention overlapping the other's experts
    overlap: OverlapConfig = field(default_factory=OverlapConfig)
    idle_ping_s: float = 1.0  # keepalive to idle shards (detects a dead shard while idle)
    max_rebuild_failures: int = RebuildPolicy.max_failures  # in a row; then unhealthy
    rebuild_backoff_s: float = RebuildPolicy.backoff_s  # after a failed rebuild; then doubles


@dataclass(frozen=True)
class NewRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class StepInput:
    """What happened since the previous step."""

    new: list[NewRequest] = field(default_factory=list)  # whole new requests
    aborts: list[str] = field(default_factory=list)  # request ids to drop now


@dataclass(frozen=True)
class StepOutput:
    outputs: list[RequestOutput]  # streamed updates (finished ones included)
    rejected: dict[str, str]  # request id -> why it was refused (nothing was done)
    failed: dict[str, str]  # request id -> why it died in flight (e.g. a shard failed)
    has_unfinished: bool


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is visible")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


class ReplicaEngine:
    """With expert parallelism, a failed or hung shard fails the requests in flight at once;
    the shards and their group are rebuilt on the next step or idle tick (`ShardGroup`)."""

    def __init__(self, config: ReplicaConfig, launcher: ShardLauncher | None = None) -> None:
        self.config, self.device = config, resolve_device(config.device)
        is_parallel = config.expert_parallel_size > 1
        model = load_model(
            config.checkpoint,
            dtype=config.dtype,
            device=self.device,
            expert_ids=() if is_parallel else None,
            wanted=(lambda n: not is_mlp_expert(n)) if is_parallel else (lambda n: True),
        )
        self.tokenizer = TextTokenizer.from_dir(config.checkpoint)
        # NOTE: before any shard starts: a bad engine config fails fast, and the shards' first
        # collective does not wait for the KV cache allocation
        self.core = EngineCore(model, self.tokenizer, config.engine)
        self.dispatcher: Dispatcher | None = None
        self.shards: ShardGroup | None = None
        if is_parallel:
            if launcher is None:
                raise ValueError("expert_parallel_size > 1 needs a shard launcher")
            placement = self.placement = ExpertPlacement(
                model.config.num_experts, config.expert_parallel_size, config.placement
            )
            self.launcher = launcher
            self.dispatcher = Dispatcher(
                placement.layout(model.config.num_layers), model, config.max_fixed_dispatch_tokens
            )
            install_expert_parallel(self.core.runner, self.dispatcher, config.overlap)
            spec = ShardSpec(
                config.checkpoint, config.dtype, self.device.type, config.collective_timeout_s
            )
            policy = RebuildPolicy(config.max_rebuild_failures, config.rebuild_backoff_s)
            self.shards = ShardGroup(spec, launcher, self.dispatcher, self.device, policy)
            self.balancer = Balancer(config.eplb, config.expert_parallel_size)

    def step(self, message: StepInput) -> StepOutput:
        """Apply aborts and new requests, run one engine step if there is work."""
        outputs, rejected, failed = [], {}, {}
        for request_id in message.aborts:
            output = self.core.abort(request_id)
            if output is not None:
                outputs.append(output)
        if self.shards is not None:
            self.shards.try_rebuild()
        for request in message.new:
            if self.shards is not None and not self.shards.is_up:
                failed[request.request_id] = self.shards.unavailable()
                continue
            try:
                self.core.add_request(request.request_id, request.prompt_ids, request.params)
            except RequestError as exc:
                rejected[request.request_id] = str(exc)
        if self.core.has_unfinished:
            try:
                self._rebalance()
                outputs.extend(self.core.step())
            except ShardFailure as exc:
                lost = {rid: str(exc) for rid in list(self.core.requests)}
                for request_id in lost:
                    self.core.abort(request_id)
                failed |= lost
                self.shards.lose(exc)
        return StepOutput(outputs, rejected, failed, self.core.has_unfinished)

    def _rebalance(self) -> None:
        """EPLB, between steps: a new layout from the last window's routing, when one is due."""
        counters = self.dispatcher.counters if self.shards is not None else None
        if counters is None or not self.balancer.is_due(counters.num_steps):
            return
        with counters.lock:  # NOTE: one host sync per window
            counts, num_steps = counters.expert_tokens.tolist(), counters.num_steps
        layout = self.balancer.plan(num_steps, counts, self.dispatcher.layout)
        if layout is not None:
            self.shards.apply_layout(layout)

    def idle(self) -> None:
        """Keep idle shards' collectives alive (a dead shard is found here); rebuild lost
        shards when an attempt is due."""
        if self.shards is not None:
            self.shards.ping()
            self.shards.try_rebuild()

    def stats(self) -> ReplicaStats:
        if self.shards is None:
            return ReplicaStats(self.core.stats())
        return ReplicaStats(self.core.stats(), self.shards.stats())

    def shutdown(self) -> None:
        """Tell the shards to stop and tear them down."""
        if self.shards is not None:
            self.shards.shutdown()
