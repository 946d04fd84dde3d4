"""GraniteMoE (ibm-granite/granite-3.x MoE): Llama attention scaled by `attention_multiplier`,
embedding/residual multipliers, logits divided by `logits_scaling`, top-k-then-softmax."""

from __future__ import annotations

from typing import Any

from torch import nn

from moe_serve.models.base import Attention, MoeForCausalLM
from moe_serve.models.config import HfSchema, ModelConfig, read_common, require_absent_or
from moe_serve.models.weights import ExpertTensor, WeightNameMap

_MOE = r"model\.layers\.(?P<layer>\d+)\.block_sparse_moe\."
_TARGET = "model.layers.{layer}.mlp.experts."
# transformers' GraniteMoeConfig defaults
_SCHEMA = HfSchema(
    defaults={
        "vocab_size": 32000,
        "hidden_size": 4096,
        "num_layers": 32,
        "num_heads": 32,
        "intermediate_size": 11008,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 2048,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
)


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
        return ModelConfig(
            **read_common(hf, generation, _SCHEMA),
            architecture=GraniteMoeForCausalLM.architecture,
            router_rule="topk_softmax",
            attention_scale=float(hf.get("attention_multiplier", 1.0)),
            embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
            residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
            logits_scaling=float(hf.get("logits_scaling", 1.0)),
        )

    def create_attention(self, config: ModelConfig) -> nn.Module:
        return Attention(config)
