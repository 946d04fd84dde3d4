"""The normalized model config every architecture is read into, and helpers for `config.json`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

RopeType = Literal["default", "linear", "dynamic"]
RouterRule = Literal["softmax_topk", "topk_softmax"]

SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(ValueError):
    """A checkpoint's config.json asks for something this code cannot serve faithfully."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: `theta` base, optional `linear` or `dynamic` (NTK) scaling."""

    theta: float = 10000.0
    scaling_type: RopeType = "default"
    factor: float = 1.0
    # NOTE: dynamic NTK rescales once a sequence outgrows this (HF: max_position_embeddings).
    original_max_position: int = 4096

    def __post_init__(self) -> None:
        if self.theta <= 0:
            raise ConfigError(f"rope theta must be positive, got {self.theta}")
        if self.scaling_type != "default" and self.factor < 1.0:
            raise ConfigError(f"rope scaling factor must be >= 1, got {self.factor}")


@dataclass(frozen=True)
class ModelConfig:
    """One schema for OLMoE, JetMoE and GraniteMoE, built by each `config_from_hf`."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    max_position_embeddings: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    # NOTE: JetMoE's decoder-layer norms use 1e-6 whatever rms_norm_eps says (as transformers does).
    layer_norm_eps: float = 1e-5
    router_rule: RouterRule = "softmax_topk"
    norm_topk_prob: bool = False
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    is_qk_norm: bool = False
    clip_qkv: float | None = None
    attention_scale: float | None = None
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    is_moe_bias: bool = False
    # JetMoE mixture of attention heads: heads = num_kv_heads * num_experts_per_tok.
    num_attention_experts: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "num_experts",
            "num_experts_per_tok",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the number of experts "
                f"({self.num_experts})"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            supported = ", ".join(SUPPORTED_ACTIVATIONS)
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported ({supported})")
        if self.dtype not in DTYPES:
            raise ConfigError(f"checkpoint dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.clip_qkv is not None and self.clip_qkv <= 0:
            raise ConfigError(f"clip_qkv must be positive, got {self.clip_qkv}")
        for token_id in (*self.eos_token_ids, self.bos_token_id, self.pad_token_id):
            if token_id is not None and not 0 <= token_id < self.vocab_size:
                raise ConfigError(
                    f"special token id {token_id} is outside the vocabulary "
                    f"(size {self.vocab_size})"
                )

    @property
    def scale(self) -> float:
        """Softmax scale of attention scores."""
        return self.attention_scale if self.attention_scale is not None else self.head_dim**-0.5


def read_rope(hf: dict[str, Any], max_position_embeddings: int) -> RopeConfig:
    """Rotary settings from either legacy (`rope_theta`, `rope_scaling`) or transformers-5
    (`rope_parameters`) keys."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"rope parameters must be a mapping, got {params!r}")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear", "dynamic"):
        raise ConfigError(f"rope type {rope_type!r} is not supported (default, linear, dynamic)")
    unsupported = set(params) - {"rope_theta", "rope_type", "type", "factor"}
    if unsupported:
        raise ConfigError(f"rope parameters {sorted(unsupported)} are not supported")
    if rope_type != "default" and "factor" not in params:
        raise ConfigError(f"rope type {rope_type!r} needs a 'factor'")
    return RopeConfig(
        theta=float(theta),
        scaling_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        original_max_position=max_position_embeddings,
    )


def read_dtype(hf: dict[str, Any]) -> str:
    """The checkpoint's dtype from `dtype` (transformers 5) or `torch_dtype` (legacy)."""
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return str(dtype).removeprefix("torch.")


def read_eos(hf: dict[str, Any], generation: dict[str, Any] | None) -> tuple[int, ...]:
    """End-of-sequence ids from config.json and generation_config.json, deduplicated in order."""
    ids: list[int] = []
    for source in (hf, generation or {}):
        value = source.get("eos_token_id")
        for token_id in value if isinstance(value, list) else [value]:
            if token_id is not None and token_id not in ids:
                ids.append(int(token_id))
    return tuple(ids)


def read_key(hf: dict[str, Any], names: tuple[str, ...], default: Any) -> Any:
    """The value of the first of `names` set in `hf` (the transformers key first, then the
    architecture's legacy names); two set to different values is an error naming both."""
    present = [(name, hf[name]) for name in names if hf.get(name) is not None]
    for name, value in present[1:]:
        if value != present[0][1]:
            first, first_value = present[0]
            raise ConfigError(f"config keys {first}={first_value!r} and {name}={value!r} disagree")
    return present[0][1] if present else default


def require_absent_or(hf: dict[str, Any], key: str, allowed: tuple[Any, ...]) -> None:
    """Fail if `key` is set to a value this code does not implement."""
    if key in hf and hf[key] not in allowed:
        raise ConfigError(f"config field {key}={hf[key]!r} is not supported (supported: {allowed})")


# ModelConfig field -> the config.json key it is read from, unless the architecture's HfSchema
# names its own keys for it.
HF_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "num_experts": "num_local_experts",
    "num_experts_per_tok": "num_experts_per_tok",
    "max_position_embeddings": "max_position_embeddings",
    "hidden_act": "hidden_act",
    "rms_norm_eps": "rms_norm_eps",
    "tie_word_embeddings": "tie_word_embeddings",
    "attention_bias": "attention_bias",
    "bos_token_id": "bos_token_id",
    "pad_token_id": "pad_token_id",
}


@dataclass(frozen=True)
class HfSchema:
    """How one architecture's config.json reads: the defaults of its transformers config class
    (per ModelConfig field, plus `eos_token_id`), and the keys it reads where they are not
    HF_KEYS': its transformers name first, then the legacy names it also accepts."""

    defaults: dict[str, Any]
    keys: dict[str, tuple[str, ...]] = field(default_factory=dict)


def read_common(
    hf: dict[str, Any], generation: dict[str, Any] | None, schema: HfSchema
) -> dict[str, Any]:
    """The ModelConfig fields every architecture reads the same way; each architecture's
    `config_from_hf` overrides what differs."""
    values = {
        name: read_key(hf, schema.keys.get(name, (key,)), schema.defaults.get(name))
        for name, key in HF_KEYS.items()
    }
    if "bos_token_id" in hf:  # NOTE: an explicit null means no such token, not the default
        values["bos_token_id"] = hf["bos_token_id"]
    if "pad_token_id" in hf:
        values["pad_token_id"] = hf["pad_token_id"]
    num_heads = values["num_heads"]
    eos_default = {"eos_token_id": schema.defaults.get("eos_token_id")}
    return values | {
        "num_kv_heads": hf.get("num_key_value_heads") or num_heads,
        "head_dim": hf.get("head_dim") or values["hidden_size"] // num_heads,
        "rope": read_rope(hf, values["max_position_embeddings"]),
        "layer_norm_eps": values["rms_norm_eps"],
        "tie_word_embeddings": bool(values["tie_word_embeddings"]),
        "attention_bias": bool(values["attention_bias"]),
        "eos_token_ids": read_eos(eos_default | hf, generation),
        "dtype": read_dtype(hf),
    }
