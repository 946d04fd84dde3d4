"""GraniteMoE (ibm-granite/granite-3.x MoE): Llama attention scaled by `attention_multiplier`,
embedding/residual multipliers, logits divided by `logits_scaling`, top-k-then-softmax."""

from __future__ import annotations

from typing import Any

from torch import nn

from moe_serve.models.base import Attention, MoeForCausalLM
from moe_serve.models.config import ModelConfig, read_dtype, read_eos, read_rope, require_absent_or
from moe_serve.models.weights import ExpertTensor, WeightNameMap

_MOE = r"model\.layers\.(?P<layer>\d+)\.block_sparse_moe\."
_TARGET = "model.layers.{layer}.mlp.experts."


class GraniteMoeForCausalLM(MoeForCausalLM):
    model_type = "granitemoe"
    architecture = "GraniteMoeForCausalLM"
    name_map = WeightNameMap(
        renames=((r"\.block_sparse_moe\.router\.layer\.", ".mlp.gate."),),
        experts=(
            ExpertTensor(_MOE + r"input_linear\.weight", _TARGET + "gate_up_proj"),
            ExpertTensor(_MOE + r"output_linear\.weight", _TARGET + "down_proj"),
        ),
    )

    @staticmethod
    def config_from_hf(hf: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
        require_absent_or(hf, "sliding_window", (None,))
        num_heads = hf.get("num_attention_heads", 32)
        hidden = hf.get("hidden_size", 4096)
        max_pos = hf.get("max_position_embeddings", 2048)
        return ModelConfig(
            architecture=GraniteMoeForCausalLM.architecture,
            vocab_size=hf.get("vocab_size", 32000),
            hidden_size=hidden,
            num_layers=hf.get("num_hidden_layers", 32),
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hidden // num_heads,
            intermediate_size=hf.get("intermediate_size", 11008),
            num_experts=hf.get("num_local_experts", 8),
            num_experts_per_tok=hf.get("num_experts_per_tok", 2),
            max_position_embeddings=max_pos,
            rope=read_rope(hf, max_pos),
            hidden_act=hf.get("hidden_act", "silu"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            layer_norm_eps=hf.get("rms_norm_eps", 1e-6),
            router_rule="topk_softmax",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            attention_scale=float(hf.get("attention_multiplier", 1.0)),
            embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
            residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
            logits_scaling=float(hf.get("logits_scaling", 1.0)),
            bos_token_id=hf.get("bos_token_id", 1),
            eos_token_ids=read_eos({"eos_token_id": 2} | hf, generation),
            pad_token_id=hf.get("pad_token_id"),
            dtype=read_dtype(hf),
        )

    def create_attention(self, config: ModelConfig) -> nn.Module:
        return Attention(config)
