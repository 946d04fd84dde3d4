"""JetMoE (jetmoe/jetmoe-8b): a mixture of attention heads (MoA) and MLP experts with bias.

MoA: each token's top-k attention experts each project it to `num_kv_heads` query heads
(head dim `kv_channels`), so a token has k x num_kv_heads query heads over shared keys/values;
each expert's output projection maps its heads back, weighted by the router. The attention
experts stay on the attention actor; only MLP experts are dispatched to shards.
Shapes: T tokens, K top-k, Hkv kv heads, D head dim, H hidden, E experts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moe_serve.models.attention import AttentionMetadata, LayerKVCache, paged_attention
from moe_serve.models.base import MoeForCausalLM, Rope
from moe_serve.models.config import (
    ConfigError,
    HfSchema,
    ModelConfig,
    read_common,
    require_absent_or,
)
from moe_serve.models.layers import Linear, apply_rotary
from moe_serve.models.moe import Router, combine_by_token, group_by_expert, grouped_linear
from moe_serve.models.weights import ExpertTensor, WeightNameMap

_MLP = r"model\.layers\.(?P<layer>\d+)\.mlp\."
_TARGET = "model.layers.{layer}.mlp.experts."
# NOTE: transformers builds JetMoE's decoder-layer norms with their default eps.
_LAYER_NORM_EPS = 1e-6
# transformers' JetMoeConfig defaults, and jetmoe-8b's own (pre-port) key names
_SCHEMA = HfSchema(
    defaults={
        "vocab_size": 32000,
        "hidden_size": 2048,
        "num_layers": 12,
        "num_heads": 32,
        "intermediate_size": 5632,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 4096,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    keys={
        "num_layers": ("num_hidden_layers", "num_layers"),
        "intermediate_size": ("intermediate_size", "ffn_hidden_size"),
        "num_experts": ("num_local_experts", "moe_num_experts"),
        "num_experts_per_tok": ("num_experts_per_tok", "moe_top_k"),
        "max_position_embeddings": ("max_position_embeddings", "n_positions"),
        "hidden_act": ("activation_function", "hidden_act"),
        "rms_norm_eps": ("rms_norm_eps", "layer_norm_epsilon"),
    },
)


class StackedLinear(nn.Module):
    """Per-expert weights [E, out, in] (the checkpoint's `input_linear` / `output_linear`)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))


class AttentionExperts(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        size, experts = config.num_kv_heads * config.head_dim, config.num_attention_experts
        self.gate = Router(
            config.hidden_size, experts, config.num_experts_per_tok, "topk_softmax", False
        )
        self.input_linear = StackedLinear(experts, config.hidden_size, size)
        self.output_linear = StackedLinear(experts, size, config.hidden_size)
        self.bias = nn.Parameter(torch.empty(config.hidden_size))


class MixtureOfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.experts = AttentionExperts(config)
        kv_size = config.num_kv_heads * config.head_dim
        self.kv_proj = Linear(config.hidden_size, 2 * kv_size, bias=False)
        self.config = config

    def forward(
        self, hidden: torch.Tensor, rope: Rope, meta: AttentionMetadata, cache: LayerKVCache
    ) -> torch.Tensor:
        cfg, experts = self.config, self.experts
        num_tokens, top_k = hidden.shape[0], cfg.num_experts_per_tok
        num_kv, dim = cfg.num_kv_heads, cfg.head_dim
        topk_ids, topk_weights = experts.gate(hidden)  # [T, K]
        groups = group_by_expert(topk_ids.flatten(), cfg.num_attention_experts, hidden.dtype)
        order = groups.order  # NOTE: every (token, k) here: the router never returns -1
        q = hidden.new_empty(num_tokens * top_k, num_kv * dim)  # [T*K, Hkv*D]
        q[order] = grouped_linear(hidden[order // top_k], groups, experts.input_linear.weight)
        k, v = self.kv_proj(hidden).chunk(2, dim=-1)
        q = apply_rotary(q.view(num_tokens, top_k * num_kv, dim), *rope)
        k = apply_rotary(k.reshape(num_tokens, num_kv, dim), *rope)
        v = v.reshape(num_tokens, num_kv, dim)
        # NOTE: query head (k, j) reads kv head j; regroup as (j, k) for grouped-query attention.
        q = q.view(num_tokens, top_k, num_kv, dim).transpose(1, 2).reshape(num_tokens, -1, dim)
        out = paged_attention(q, k, v, cache, meta, cfg.scale)  # [T, Hkv*K, D]
        out = out.view(num_tokens, num_kv, top_k, dim).transpose(1, 2)  # [T, K, Hkv, D]
        out = out.reshape(num_tokens * top_k, -1)[order]  # [N, Hkv*D], grouped by expert
        out = grouped_linear(out, groups, experts.output_linear.weight)  # [N, H]
        return combine_by_token(out, groups, topk_weights, num_tokens) + experts.bias


class JetMoeForCausalLM(MoeForCausalLM):
    model_type = "jetmoe"
    architecture = "JetMoeForCausalLM"
    name_map = WeightNameMap(
        renames=((r"\.self_attention\.", ".self_attn."), (r"\.router\.layer\.", ".gate.")),
        experts=(
            ExpertTensor(_MLP + r"input_linear\.weight", _TARGET + "gate_up_proj"),
            ExpertTensor(_MLP + r"output_linear\.weight", _TARGET + "down_proj"),
        ),
    )

    @staticmethod
    def config_from_hf(hf: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
        # NOTE: jetmoe/jetmoe-8b predates its transformers port and keeps its own key names.
        require_absent_or(hf, "glu", (True,))
        require_absent_or(hf, "rotary_percent", (1.0,))
        common = read_common(hf, generation, _SCHEMA)
        num_kv_heads = hf.get("num_key_value_heads", 16)
        top_k = common["num_experts_per_tok"]
        if hf.get("num_attention_heads", num_kv_heads * top_k) != num_kv_heads * top_k:
            raise ConfigError(
                f"num_attention_heads ({hf['num_attention_heads']}) must be num_key_value_heads x "
                f"top-k ({num_kv_heads} x {top_k}): JetMoE's attention experts give each token "
                "that many query heads"
            )
        return ModelConfig(
            **common
            | {
                "num_heads": num_kv_heads * top_k,
                "num_kv_heads": num_kv_heads,
                "head_dim": hf.get("kv_channels", 128),
                "layer_norm_eps": _LAYER_NORM_EPS,
            },
            architecture=JetMoeForCausalLM.architecture,
            router_rule="topk_softmax",
            is_moe_bias=True,
            num_attention_experts=common["num_experts"],
        )

    def create_attention(self, config: ModelConfig) -> nn.Module:
        return MixtureOfAttention(config)
