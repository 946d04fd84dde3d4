"""OLMoE (allenai/OLMoE-1B-7B-0924): q/k RMSNorm, optional q/k/v clipping, softmax-then-top-k."""

from __future__ import annotations

from typing import Any

from torch import nn

from moe_serve.models.base import Attention, MoeForCausalLM
from moe_serve.models.config import (
    ConfigError,
    HfSchema,
    ModelConfig,
    read_common,
    require_absent_or,
)
from moe_serve.models.weights import ExpertTensor, WeightNameMap

_EXPERT = r"model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<expert>\d+)\."
_TARGET = "model.layers.{layer}.mlp.experts."
# transformers' OlmoeConfig defaults
_SCHEMA = HfSchema(
    defaults={
        "vocab_size": 50304,
        "hidden_size": 2048,
        "num_layers": 16,
        "num_heads": 16,
        "intermediate_size": 2048,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "max_position_embeddings": 4096,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "pad_token_id": 1,
        "eos_token_id": 50279,
    },
    keys={"num_experts": ("num_experts",)},
)


class OlmoeForCausalLM(MoeForCausalLM):
    model_type = "olmoe"
    architecture = "OlmoeForCausalLM"
    name_map = WeightNameMap(
        experts=(
            ExpertTensor(_EXPERT + r"gate_proj\.weight", _TARGET + "gate_up_proj", 0, 2),
            ExpertTensor(_EXPERT + r"up_proj\.weight", _TARGET + "gate_up_proj", 1, 2),
            ExpertTensor(_EXPERT + r"down_proj\.weight", _TARGET + "down_proj"),
        )
    )

    @staticmethod
    def config_from_hf(hf: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
        require_absent_or(hf, "sliding_window", (None,))
        common = read_common(hf, generation, _SCHEMA)
        hidden, num_heads, head_dim = (common[k] for k in ("hidden_size", "num_heads", "head_dim"))
        if head_dim * num_heads != hidden:
            raise ConfigError(
                f"OLMoE's q_norm spans hidden_size ({hidden}); heads x head_dim "
                f"({num_heads} x {head_dim}) must equal it"
            )
        return ModelConfig(
            **common,
            architecture=OlmoeForCausalLM.architecture,
            router_rule="softmax_topk",
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            is_qk_norm=True,
            clip_qkv=hf.get("clip_qkv"),
        )

    def create_attention(self, config: ModelConfig) -> nn.Module:
        return Attention(config)
