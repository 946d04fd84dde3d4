"""The decoder skeleton shared by all architectures; each architecture file fills in its parts.

Shapes: T tokens in the flat batch, H hidden, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from moe_serve.models.attention import (
    AttentionMetadata,
    LayerKVCache,
    allocate_kv_cache,
    paged_attention,
)
from moe_serve.models.config import ModelConfig
from moe_serve.models.layers import Linear, RMSNorm, RotaryEmbedding, apply_rotary, linear
from moe_serve.models.moe import MoeBlock
from moe_serve.models.weights import WeightNameMap

Rope = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    """Grouped-query attention with optional q/k RMSNorm and q/k/v clipping (OLMoE, Granite)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        bias = config.attention_bias
        self.q_proj = Linear(config.hidden_size, q_size, bias=bias)
        self.k_proj = Linear(config.hidden_size, kv_size, bias=bias)
        self.v_proj = Linear(config.hidden_size, kv_size, bias=bias)
        self.o_proj = Linear(q_size, config.hidden_size, bias=bias)
        if config.is_qk_norm:
            self.q_norm = RMSNorm(q_size, config.rms_norm_eps)
            self.k_norm = RMSNorm(kv_size, config.rms_norm_eps)
        self.config = config

    def forward(
        self, hidden: torch.Tensor, rope: Rope, meta: AttentionMetadata, cache: LayerKVCache
    ) -> torch.Tensor:
        cfg = self.config
        q, k, v = self.q_proj(hidden), self.k_proj(hidden), self.v_proj(hidden)
        if cfg.is_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv is not None:
            q, k, v = (x.clamp(-cfg.clip_qkv, cfg.clip_qkv) for x in (q, k, v))
        num_tokens = hidden.shape[0]
        q = apply_rotary(q.view(num_tokens, cfg.num_heads, cfg.head_dim), *rope)
        k = apply_rotary(k.view(num_tokens, cfg.num_kv_heads, cfg.head_dim), *rope)
        v = v.view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        out = paged_attention(q, k, v, cache, meta, cfg.scale)
        return self.o_proj(out.reshape(num_tokens, -1))


class DecoderLayer(nn.Module):
    """Pre-norm block: attention then MoE, each added back scaled by the residual multiplier."""

    def __init__(self, config: ModelConfig, self_attn: nn.Module, mlp: MoeBlock) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layer_norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layer_norm_eps)
        self.mlp = mlp
        self.residual_multiplier = config.residual_multiplier

    def forward(self, hidden, rope: Rope, meta: AttentionMetadata, cache: LayerKVCache):
        return self.finish(*self.start(hidden, rope, meta, cache))

    def start(self, hidden, rope: Rope, meta: AttentionMetadata, cache: LayerKVCache):
        """Attention, then the MoE block started: (residual stream, the MoE's pending work)."""
        attn = self.self_attn(self.input_layernorm(hidden), rope, meta, cache)
        hidden = torch.add(hidden, attn, alpha=self.residual_multiplier)
        return hidden, self.mlp.start(self.post_attention_layernorm(hidden))

    def finish(self, hidden: torch.Tensor, pending) -> torch.Tensor:
        return torch.add(hidden, self.mlp.finish(pending), alpha=self.residual_multiplier)


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig, layers: list[DecoderLayer]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MoeForCausalLM(nn.Module):
    """Base of every architecture: flat-batch forward over a paged KV cache.

    Subclasses set `model_type` (config.json's), `architecture`, `name_map`, implement
    `config_from_hf` and `create_attention`. `expert_ids` selects which experts this instance
    materialises (all by default; none on an attention actor whose experts live in shards);
    `layer_expert_ids` instead gives each MoE layer its own (an expert shard under EPLB).
    """

    model_type: ClassVar[str]
    architecture: ClassVar[str]
    name_map: ClassVar[WeightNameMap]

    def __init__(
        self,
        config: ModelConfig,
        expert_ids: Sequence[int] | None = None,
        layer_expert_ids: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        if layer_expert_ids is None:
            experts = tuple(range(config.num_experts)) if expert_ids is None else tuple(expert_ids)
            layer_expert_ids = [experts] * config.num_layers
        elif expert_ids is not None or len(layer_expert_ids) != config.num_layers:
            raise ValueError(
                f"layer_expert_ids needs one entry per layer ({config.num_layers}), "
                f"and no expert_ids beside it"
            )
        layers = [
            DecoderLayer(config, self.create_attention(config), MoeBlock(config, experts))
            for experts in layer_expert_ids
        ]
        self.model = DecoderModel(config, layers)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.config = config
        self.rotary = RotaryEmbedding(config.rope, config.head_dim)

    @staticmethod
    def config_from_hf(hf: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
        raise NotImplementedError

    def create_attention(self, config: ModelConfig) -> nn.Module:
        raise NotImplementedError

    def moe_blocks(self) -> list[MoeBlock]:
        return [layer.mlp for layer in self.model.layers]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: Sequence[LayerKVCache],
    ) -> torch.Tensor:
        """input_ids, positions [T] -> final-norm hidden states [T, H]; writes the KV cache."""
        hidden, rope = self._embed(input_ids, positions, meta)
        for layer, cache in zip(self.model.layers, kv_caches, strict=True):
            hidden = layer(hidden, rope, meta, cache)
        return self.model.norm(hidden)

    def _embed(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata):
        hidden = self.model.embed_tokens(input_ids) * self.config.embedding_multiplier
        longest = max(meta.seq_lens, default=1)  # NOTE: host ints: no sync
        return hidden, self.rotary.cos_sin(positions, meta.token_seq_lens, hidden.dtype, longest)

    def forward_micro_batches(
        self,
        batches: Sequence[tuple[torch.Tensor, torch.Tensor, AttentionMetadata]],
        kv_caches: Sequence[LayerKVCache],
    ) -> list[torch.Tensor]:
        """`forward` of several micro-batches (input_ids, positions, meta) of one step, in
        ping-pong: a micro-batch's attention runs while the MoE work `start`ed for the one
        before it is in flight (its experts on the shards), and its own is `finish`ed only
        when its next layer needs it. Same results as `forward` of each."""
        embedded = [self._embed(ids, positions, meta) for ids, positions, meta in batches]
        hidden = [h for h, _ in embedded]
        pending: list = [None] * len(batches)
        previous = None
        for layer, cache in zip(self.model.layers, kv_caches, strict=True):
            for i, (_, rope) in enumerate(embedded):
                if previous is not None:
                    hidden[i] = previous.finish(hidden[i], pending[i])
                hidden[i], pending[i] = layer.start(hidden[i], rope, batches[i][2], cache)
            previous = layer
        return [
            self.model.norm(previous.finish(h, p)) for h, p in zip(hidden, pending, strict=True)
        ]

    @property
    def materialised(self) -> nn.Parameter:
        """A parameter that holds data (a shard-less attention model leaves experts on meta):
        its dtype and device are the model's."""
        return next(p for p in self.parameters() if not p.is_meta)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> list[LayerKVCache]:
        """A zeroed paged KV cache for every layer, in the model's dtype, on its device."""
        cfg, param = self.config, self.materialised
        return allocate_kv_cache(
            cfg.num_layers,
            num_blocks,
            block_size,
            cfg.num_kv_heads,
            cfg.head_dim,
            param.dtype,
            param.device,
        )

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> float32 logits [N, V]."""
        weight = (
            self.model.embed_tokens.weight
            if self.config.tie_word_embeddings
            else self.lm_head.weight
        )
        logits = linear(hidden, weight)
        if self.config.logits_scaling != 1.0:  # NOTE: a [N, V] pass per step; only Granite sets it
            logits = logits / self.config.logits_scaling
        # NOTE: row-major: `linear` returns a transposed view on CPU, and reductions over V
        # on it (the sampler's argmax, log_softmax) run strided: at [64, 50304] argmax took
        # 22 ms on the view against 4 ms for this copy plus 2 ms for max on the copy
        return logits.float().contiguous()
