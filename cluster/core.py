"""The engine core of one replica: dense model, KV cache, scheduler and (for
expert_parallel_size > 1) the expert shards it drives over collectives.

Driven one step at a time by messages (`StepInput` -> `StepOutput`) so that it can live in its
own Ray actor, whose methods run on the process's main thread.
NOTE: measured on CPU: MKL's small matmuls run 3-4x slower when called from any thread but
the main one, which makes a whole decode step ~2x slower; Serve runs user code off the main
thread, hence the separate actor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from cluster.engine import Engine, EngineConfig
from cluster.expert_parallel import Dispatcher, ShardFailure, install_expert_parallel
from cluster.launchers import ShardLauncher, ShardSpec
from cluster.outputs import RequestOutput
from cluster.params import RequestError, SamplingParams
from cluster.placement import ExpertPlacement, Strategy
from cluster.shard import is_mlp_expert
from cluster.transport import CollectiveTransport, host_store, local_ip
from models.registry import load_model
from models.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaConfig:
    checkpoint: str  # a local checkpoint directory
    dtype: str | None = None  # None/"auto": the checkpoint's
    device: str = "auto"  # auto | cpu | cuda
    expert_parallel_size: int = 1
    placement: Strategy = "contiguous"
    engine: EngineConfig = field(default_factory=EngineConfig)
    collective_timeout_s: float = 30.0  # every collective, and the shards' join
    idle_ping_s: float = 1.0  # keepalive to idle shards (detects a dead shard while idle)


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


class EngineCore:
    """With expert parallelism, a failed or hung shard fails the requests in flight, then the
    shards and their group are rebuilt before the step returns."""

    def __init__(self, config: ReplicaConfig, launcher: ShardLauncher | None = None) -> None:
        self.config, self.device = config, resolve_device(config.device)
        self.num_rebuilds = 0
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
        self.engine = Engine(model, self.tokenizer, config.engine)
        self.dispatcher: Dispatcher | None = None
        if is_parallel:
            if launcher is None:
                raise ValueError("expert_parallel_size > 1 needs a shard launcher")
            self.placement = ExpertPlacement(
                model.config.num_experts, config.expert_parallel_size, config.placement
            )
            self.launcher = launcher
            self.dispatcher = Dispatcher(self.placement, model)
            install_expert_parallel(model, self.dispatcher)
            self._connect()

    def _connect(self) -> None:
        host, world_size = local_ip(), self.config.expert_parallel_size + 1
        store = host_store(host, world_size, self.config.collective_timeout_s)
        spec = ShardSpec(
            self.config.checkpoint,
            self.config.dtype,
            self.device.type,
            self.config.collective_timeout_s,
        )
        self.launcher.start(spec, self.placement.shard_expert_ids, host, store.port)
        self.dispatcher.attach(
            CollectiveTransport(
                store, 0, world_size, self.device, self.config.collective_timeout_s, host
            )
        )
        self._store = store  # NOTE: keep the rendezvous alive while the group lives

    def _rebuild(self, error: BaseException) -> None:
        log.warning("rebuilding expert shards after: %s", error)
        self._disconnect()
        self.launcher.stop()
        self._connect()
        self.num_rebuilds += 1

    def step(self, message: StepInput) -> StepOutput:
        """Apply aborts and new requests, run one engine step if there is work."""
        outputs, rejected, failed = [], {}, {}
        for request_id in message.aborts:
            output = self.engine.abort(request_id)
            if output is not None:
                outputs.append(output)
        for request in message.new:
            try:
                self.engine.add_request(request.request_id, request.prompt_ids, request.params)
            except RequestError as exc:
                rejected[request.request_id] = str(exc)
        if self.engine.has_unfinished:
            try:
                outputs.extend(self.engine.step())
            except ShardFailure as exc:
                failed = {rid: str(exc) for rid in list(self.engine.requests)}
                for request_id in failed:
                    self.engine.abort(request_id)
                self._recover(exc)
        return StepOutput(outputs, rejected, failed, self.engine.has_unfinished)

    def _recover(self, error: BaseException) -> None:
        try:
            self._rebuild(error)
        except Exception:  # NOTE: the next step or idle ping retries
            log.exception("rebuilding the expert shards failed")

    def idle(self) -> None:
        """Keep idle shards' collectives alive; a dead shard is found and replaced here."""
        if self.dispatcher is None:
            return
        try:
            self.dispatcher.ping()
        except ShardFailure as exc:
            self._recover(exc)

    def stats(self) -> dict:
        stats = dict(self.engine.stats(), num_rebuilds=self.num_rebuilds)
        if self.dispatcher is not None:
            stats["dispatch"] = self.dispatcher.stats.snapshot()
        return stats

    def shutdown(self) -> None:
        """Tell the shards to stop and tear them down."""
        if self.dispatcher is None:
            return
        try:
            if self.dispatcher.transport is not None:
                self.dispatcher.stop()
        except Exception as exc:  # NOTE: shards already gone: nothing to tell them
            log.info("shards did not take STOP: %s", exc)
        self._disconnect()
        self.launcher.stop()

    def _disconnect(self) -> None:
        if self.dispatcher.transport is not None:
            self.dispatcher.transport.close()
            self.dispatcher.transport = None
