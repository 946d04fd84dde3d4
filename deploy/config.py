"""The serving config (YAML): endpoints, limits and the models to serve. Unknown keys are
errors.

The same schema is `moe-serve run --config FILE`, the Serve application's args, and what the
Helm chart renders into `serveConfigV2`. The API key is never part of the application's args
(they are visible in the Serve config and the Ray dashboard): the gateway reads
$MOE_SERVE_API_KEY from its own environment. `api_key` in a config file is for `moe-serve run`
on a Ray instance of its own, which hands it to that instance's environment (deploy/launch.py).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moe_serve.cluster.engine_core import EngineConfig
from moe_serve.cluster.eplb import EplbConfig
from moe_serve.cluster.overlap import OverlapConfig
from moe_serve.cluster.replica_engine import ReplicaConfig
from moe_serve.deploy.limits import LimitsConfig

API_KEY_ENV = "MOE_SERVE_API_KEY"
GIB = 1 << 30
DEMO_ARCHS = ("olmoe", "jetmoe", "granitemoe")


class ConfigFileError(ValueError):
    """The config file is missing, not YAML, or does not match the schema."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HttpConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)


class GrpcConfig(Strict):
    port: int = Field(9000, ge=1, le=65535)
    # NOTE: Serve's proxy takes up to 2 GiB by default; it refuses larger messages with
    # RESOURCE_EXHAUSTED (set where the proxy starts: RAY_SERVE_GRPC_MAX_MESSAGE_SIZE)
    max_message_bytes: int = Field(4 << 20, ge=1 << 10, lt=1 << 31)


class MetricsConfig(Strict):
    require_api_key: bool = False  # /metrics answers 401 without the API key


class AutoscalingConfig(Strict):
    """Ray Serve autoscaling of a model's replicas (each a gang of attention + shards)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    metrics_interval_s: float = Field(10.0, gt=0)
    look_back_period_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})"
            )
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(
                f"initial_replicas ({initial}) must lie in [min_replicas, max_replicas] "
                f"= [{self.min_replicas}, {self.max_replicas}]"
            )
        return self


class ResourcesConfig(Strict):
    """Ray resources per actor. On CUDA every actor (attention and each shard) also takes one
    GPU; on CPU these fractions let several shards share a node's cores."""

    replica_cpus: float = Field(0.5, gt=0)  # the Serve replica (front) + the engine actor
    shard_cpus: float = Field(0.5, gt=0)
    torch_threads: int | None = Field(None, ge=1)  # engine actor's threads (default: cores)


class EplbSettings(Strict):
    """Expert-parallel load balancing (cluster/eplb.py): off; static (one new layout after
    the first window of steps); periodic (a new one from each window, if it gains min_gain)."""

    mode: Literal["off", "static", "periodic"] = EplbConfig.mode
    window_steps: int = Field(EplbConfig.window_steps, ge=1)
    num_redundant_experts: int | None = Field(None, ge=0)  # per layer; None: one per shard
    min_gain: float = Field(EplbConfig.min_gain, ge=0)  # in max/mean shard load

    def config(self) -> EplbConfig:
        return EplbConfig(**self.model_dump())


class OverlapSettings(Strict):
    """Two micro-batches per step in ping-pong, one's attention overlapping the other's experts
    on the shards (cluster/overlap.py): auto (where measured faster), on, off."""

    mode: Literal["auto", "on", "off"] = OverlapConfig.mode
    min_tokens: int = Field(OverlapConfig.min_tokens, ge=1)  # smaller steps never split
    probe_steps: int = Field(OverlapConfig.probe_steps, ge=1)
    reprobe_steps: int = Field(OverlapConfig.reprobe_steps, ge=1)

    def config(self) -> OverlapConfig:
        return OverlapConfig(**self.model_dump())


class ServedModelConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
    source: str = Field(min_length=1)  # a local checkpoint directory or a hub id
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = ReplicaConfig.device
    expert_parallel_size: int = Field(ReplicaConfig.expert_parallel_size, ge=1)
    placement: Literal["contiguous", "round_robin"] = ReplicaConfig.placement
    max_model_len: int | None = Field(None, ge=2)
    max_num_seqs: int = Field(EngineConfig.max_num_seqs, ge=1)
    max_num_batched_tokens: int = Field(EngineConfig.max_num_batched_tokens, ge=16)
    block_size: int = Field(EngineConfig.block_size, ge=1, le=256)
    kv_cache_blocks: int | None = Field(None, ge=1)
    kv_cache_memory_gb: float | None = Field(None, gt=0)
    enable_prefix_caching: bool = EngineConfig.enable_prefix_caching  # reuse shared prefixes
    # "flex": attention reads the paged cache in place; "sdpa": gathers it (the baseline)
    attention_backend: Literal["flex", "sdpa"] = EngineConfig.attention_backend
    max_queued_requests: int = Field(64, ge=1)  # beyond: 429 / RESOURCE_EXHAUSTED at once
    collective_timeout_s: float = Field(ReplicaConfig.collective_timeout_s, gt=0)
    # steps of at most this many tokens dispatch to the shards in fixed-capacity mode; 0: none
    max_fixed_dispatch_tokens: int = Field(ReplicaConfig.max_fixed_dispatch_tokens, ge=0)
    max_rebuild_failures: int = Field(ReplicaConfig.max_rebuild_failures, ge=1)  # in a row
    rebuild_backoff_s: float = Field(ReplicaConfig.rebuild_backoff_s, gt=0)  # then doubles
    eplb: EplbSettings = EplbSettings()
    overlap: OverlapSettings = OverlapSettings()
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    resources: ResourcesConfig = ResourcesConfig()

    @property
    def deployment_name(self) -> str:
        """The model's Serve deployment (Serve names allow fewer characters than ours)."""
        return "model-" + re.sub(r"[^A-Za-z0-9_-]+", "-", self.name)

    def gang_bundles(self, is_cuda: bool) -> list[dict[str, float]]:
        """A replica's placement group. Bundle 0: the engine actor (and the Serve replica
        in front of it); bundles 1..N: one per expert shard."""
        gpu = {"GPU": 1.0} if is_cuda else {}
        bundles = [{"CPU": self.resources.replica_cpus} | gpu]
        if self.expert_parallel_size > 1:
            bundles += [{"CPU": self.resources.shard_cpus} | gpu] * self.expert_parallel_size
        return bundles

    @model_validator(mode="after")
    def _one_kv_budget(self) -> ServedModelConfig:
        if self.kv_cache_blocks is not None and self.kv_cache_memory_gb is not None:
            raise ValueError("set kv_cache_blocks or kv_cache_memory_gb, not both")
        if self.eplb.mode != "off" and self.expert_parallel_size == 1:
            raise ValueError("eplb balances expert shards: it needs expert_parallel_size > 1")
        return self

    def replica_config(self, checkpoint: str) -> ReplicaConfig:
        """The engine-side config, for a checkpoint already resolved to a local directory."""
        memory = self.kv_cache_memory_gb
        engine = EngineConfig(
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            block_size=self.block_size,
            num_kv_blocks=self.kv_cache_blocks,
            kv_cache_bytes=int(memory * GIB) if memory is not None else None,
            enable_prefix_caching=self.enable_prefix_caching,
            attention_backend=self.attention_backend,
        )
        return ReplicaConfig(
            checkpoint,
            dtype=None if self.dtype == "auto" else self.dtype,
            device=self.device,
            expert_parallel_size=self.expert_parallel_size,
            placement=self.placement,
            engine=engine,
            collective_timeout_s=self.collective_timeout_s,
            max_fixed_dispatch_tokens=self.max_fixed_dispatch_tokens,
            max_rebuild_failures=self.max_rebuild_failures,
            rebuild_backoff_s=self.rebuild_backoff_s,
            eplb=self.eplb.config(),
            overlap=self.overlap.config(),
        )


class ServeConfig(Strict):
    http: HttpConfig = HttpConfig()
    grpc: GrpcConfig = GrpcConfig()
    api_key: str | None = Field(None, min_length=8)  # moe-serve run only; see the docstring
    limits: LimitsConfig = LimitsConfig()
    metrics: MetricsConfig = MetricsConfig()
    models: list[ServedModelConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> ServeConfig:
        for what, names in (
            ("model names", [m.name for m in self.models]),
            (
                "deployment names (the name with . : / as -)",
                [m.deployment_name for m in self.models],
            ),
        ):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"{what} must be unique; repeated: {duplicates}")
        return self


def api_key_from_environment() -> str | None:
    """The gateway's key: $MOE_SERVE_API_KEY of its own process; None (or empty): no auth."""
    return os.environ.get(API_KEY_ENV) or None


def format_errors(error: ValidationError, where: str) -> str:
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{where}: {location}: {message}")
    return "\n".join(lines)


def parse_serve_config(data: Any, where: str = "config") -> ServeConfig:
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigFileError(format_errors(exc, where)) from None


def load_serve_config(path: str | Path) -> ServeConfig:
    """Read and validate a YAML config file; errors name the file and the key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigFileError(f"{path}: no such config file") from None
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{path}: not valid YAML: {exc}") from None
    return parse_serve_config(data, str(path))


def demo_config() -> ServeConfig:
    """Three tiny models, one per architecture, each with two expert shards, on CPU."""
    return parse_serve_config(
        {
            "models": [
                {
                    "name": f"tiny-{arch}",
                    "source": f"tiny:{arch}",
                    "device": "cpu",
                    "expert_parallel_size": 2,
                    "max_num_seqs": 32,
                    "resources": {"replica_cpus": 0.25, "shard_cpus": 0.25},
                }
                for arch in DEMO_ARCHS
            ]
        },
        "built-in demo",
    )
