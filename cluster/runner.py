"""Model runner: flattens a scheduled batch, runs the model over the paged cache, returns the
logits the sampler needs. Shapes: T tokens this step, S sampling sequences, V vocabulary."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moe_serve.cluster.overlap import OverlapPolicy
from moe_serve.cluster.scheduler import ScheduledSeq
from moe_serve.models.attention import (
    AttentionBackend,
    AttentionMetadata,
    LayerKVCache,
)
from moe_serve.models.base import MoeForCausalLM
from moe_serve.models.paged_flex import check_supported, warm_up


@dataclass(frozen=True)
class StepLogits:
    """Logits of one step: one row per sampling sequence, and prompt rows where asked."""

    sampling: torch.Tensor  # [S, V] float32, in the order of the sampling sequences
    prompt: dict[int, torch.Tensor]  # seq_id -> [num_tokens, V] for prompt-logprob chunks


def kv_cache_bytes_per_block(model: MoeForCausalLM, block_size: int) -> int:
    cfg = model.config
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
    return per_token * block_size * model.materialised.dtype.itemsize


def split_batch(batch: list[ScheduledSeq]) -> list[list[ScheduledSeq]]:
    """Two micro-batches of whole sequences (two at least), as close to half the tokens each
    as a cut of the batch allows."""
    num_tokens = sum(item.num_tokens for item in batch)
    prefix, best_cut, best_gap = 0, 1, num_tokens
    for cut in range(1, len(batch)):
        prefix += batch[cut - 1].num_tokens
        if abs(2 * prefix - num_tokens) < best_gap:
            best_cut, best_gap = cut, abs(2 * prefix - num_tokens)
    return [batch[:best_cut], batch[best_cut:]]


class ModelRunner:
    """Runs the model over the paged cache, one scheduled batch per step. `step_hook`, when
    set, is called with the step's micro-batch token counts before each forward pass (expert
    parallelism opens the shards' step). With an `overlap` policy, steps it chooses run as two
    micro-batches in ping-pong (`MoeForCausalLM.forward_micro_batches`): worth it only where
    experts run elsewhere, so expert parallelism sets one."""

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
        self.kv_caches: list[LayerKVCache] = model.allocate_kv_cache(num_blocks, block_size)
        self.step_hook: Callable[[list[int]], None] | None = None
        self.overlap: OverlapPolicy | None = None
        if attention_backend == "flex":
            check_supported(param.device, cfg.head_dim, block_size)
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

    def _forward(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, int]:
        """The final hidden states [T, H] and the number of micro-batches they took."""
        num_tokens, policy = sum(item.num_tokens for item in batch), self.overlap
        is_split = policy is not None and len(batch) >= 2 and policy.choose(num_tokens)
        inputs = [self._flatten(part) for part in (split_batch(batch) if is_split else [batch])]
        if self.step_hook is not None:
            self.step_hook([len(input_ids) for input_ids, _, _ in inputs])
        if not is_split:
            return self.model(*inputs[0], self.kv_caches), 1
        # NOTE: the micro-batches are a cut of the batch: their rows concatenate in order
        return torch.cat(self.model.forward_micro_batches(inputs, self.kv_caches)), 2

    @torch.inference_mode()
    def execute(
        self, batch: list[ScheduledSeq], prompt_logprob_ids: set[int] = frozenset()
    ) -> StepLogits:
        """Run one step. Rows for prompt logprobs are computed for sequences in
        `prompt_logprob_ids` while their chunk lies in the prompt."""
        started = time.perf_counter()
        hidden, num_parts = self._forward(batch)  # [T, H]
        num_tokens, policy = len(hidden), self.overlap
        if policy is not None and policy.is_probing(num_tokens):
            if self.device.type == "cuda":  # NOTE: a host sync, on probed steps only
                torch.cuda.synchronize(self.device)
            policy.record(num_tokens, num_parts == 2, time.perf_counter() - started)
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
