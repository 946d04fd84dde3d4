"""Model runner: flattens a scheduled batch, runs the model over the paged cache, returns the
logits the sampler needs. Shapes: T tokens this step, S sampling sequences, V vocabulary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moe_serve.cluster.scheduler import ScheduledSeq
from moe_serve.models.attention import (
    AttentionBackend,
    AttentionMetadata,
    LayerKVCache,
    allocate_kv_cache,
)
from moe_serve.models.base import MoeForCausalLM
from moe_serve.models.paged_flex import warm_up


@dataclass(frozen=True)
class StepLogits:
    """Logits of one step: one row per sampling sequence, and prompt rows where asked."""

    sampling: torch.Tensor  # [S, V] float32, in the order of the sampling sequences
    prompt: dict[int, torch.Tensor]  # seq_id -> [num_tokens, V] for prompt-logprob chunks


def kv_cache_bytes_per_block(model: MoeForCausalLM, block_size: int) -> int:
    cfg = model.config
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
    return per_token * block_size * model.materialised.dtype.itemsize


class ModelRunner:
    """Runs the model over the paged cache, one scheduled batch per step. `step_hook`, when
    set, is called with the step's token count before each forward pass (expert parallelism
    opens the shards' step)."""

    def __init__(
        self,
        model: MoeForCausalLM,
        num_blocks: int,
        block_size: int,
        attention_backend: AttentionBackend = "flex",
    ) -> None:
        cfg = model.config
        param = model.materialised
        self.model, self.block_size, self.device = model, block_size, param.device
        self.num_blocks, self.attention_backend = num_blocks, attention_backend
        self.kv_caches: list[LayerKVCache] = allocate_kv_cache(
            cfg.num_layers,
            num_blocks,
            block_size,
            cfg.num_kv_heads,
            cfg.head_dim,
            param.dtype,
            param.device,
        )
        self.step_hook: Callable[[int], None] | None = None
        if attention_backend == "flex":
            warm_up(self.kv_caches[0].key, cfg.num_heads, block_size)

    def _flatten(self, batch: list[ScheduledSeq]):
        input_ids: list[int] = []
        positions: list[int] = []
        for item in batch:
            stop = item.start + item.num_tokens
            input_ids.extend(item.seq.token_ids[item.start : stop])
            positions.extend(range(item.start, stop))
        meta = AttentionMetadata.build(
            [item.num_tokens for item in batch],
            [item.start + item.num_tokens for item in batch],
            [item.seq.block_ids for item in batch],
            self.block_size,
            self.num_blocks,
            self.attention_backend,
            self.device,
        )
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        return as_long(input_ids), as_long(positions), meta

    @torch.inference_mode()
    def execute(
        self, batch: list[ScheduledSeq], prompt_logprob_ids: set[int] = frozenset()
    ) -> StepLogits:
        """Run one step. Rows for prompt logprobs are computed for sequences in
        `prompt_logprob_ids` while their chunk lies in the prompt."""
        input_ids, positions, meta = self._flatten(batch)
        if self.step_hook is not None:
            self.step_hook(len(input_ids))
        hidden = self.model(input_ids, positions, meta, self.kv_caches)  # [T, H]
        ends, offset = [], 0
        prompt: dict[int, torch.Tensor] = {}
        for item in batch:
            if item.seq.seq_id in prompt_logprob_ids and item.start < item.seq.num_prompt_tokens:
                rows = hidden[offset : offset + item.num_tokens]
                prompt[item.seq.seq_id] = self.model.compute_logits(rows)
            offset += item.num_tokens
            if item.is_sampling:
                ends.append(offset - 1)
        sampling = self.model.compute_logits(hidden[ends])  # [S, V]
        return StepLogits(sampling, prompt)
