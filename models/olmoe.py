"""OLMoE (allenai/OLMoE-1B-7B-0924): q/k RMSNorm, optional q/k/v clipping, softmax-then-top-k."""

from __future__ import annotations

from typing import Any

from torch import nn

from moe_serve.models.base import Attention, MoeForCausalLM
from moe_serve.models.config import (
    ConfigError,
    ModelConfig,
    read_dtype,
    read_eos,
    read_rope,
    require_absent_or,
)
from moe_serve.models.weights import ExpertTensor, WeightNameMap

_EXPERT = r"model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<expert>\d+)\."
_TARGET = "model.layers.{layer}.mlp.experts."


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
        num_heads = hf.get("num_attention_heads", 16)
        hidden = hf.get("hidden_size", 2048)
        head_dim = hf.get("head_dim") or hidden // num_heads
        max_pos = hf.get("max_position_embeddings", 4096)
        if head_dim * num_heads != hidden:
            raise ConfigError(
                f"OLMoE's q_norm spans hidden_size ({hidden}); heads x head_dim "
                f"({num_heads} x {head_dim}) must equal it"
            )
        return ModelConfig(
            architecture=OlmoeForCausalLM.architecture,
            vocab_size=hf.get("vocab_size", 50304),
            hidden_size=hidden,
            num_layers=hf.get("num_hidden_layers", 16),
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            intermediate_size=hf.get("intermediate_size", 2048),
            num_experts=hf.get("num_experts", 64),
            num_experts_per_tok=hf.get("num_experts_per_tok", 8),
            max_position_embeddings=max_pos,
            rope=read_rope(hf, max_pos),
            hidden_act=hf.get("hidden_act", "silu"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            layer_norm_eps=hf.get("rms_norm_eps", 1e-5),
            router_rule="softmax_topk",
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            is_qk_norm=True,
            clip_qkv=hf.get("clip_qkv"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=read_eos({"eos_token_id": 50279} | hf, generation),
            pad_token_id=hf.get("pad_token_id", 1),
            dtype=read_dtype(hf),
        )

    def create_attention(self, config: ModelConfig) -> nn.Module:
        return Attention(config)
