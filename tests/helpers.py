"""Shared test helpers: reference checkpoints written by transformers, a minimal paged runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moe_serve.models.attention import AttentionBackend, AttentionMetadata
from moe_serve.models.base import MoeForCausalLM

HF_CLASSES = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
    "jetmoe": ("JetMoeConfig", "JetMoeForCausalLM"),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM"),
}
BASE = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def write_hf_checkpoint(
    arch: str,
    out: Path,
    seed: int = 0,
    std: float = 0.3,
    max_shard_size: str | None = None,
    **overrides: Any,
) -> torch.nn.Module:
    """A random transformers model of `arch` saved with `save_pretrained`; returns the model."""
    import transformers

    config_name, model_name = HF_CLASSES[arch]
    config = getattr(transformers, config_name)(**(BASE | overrides))
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(std=std)
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return model


def hf_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Full-sequence logits [L, V] of one sequence."""
    with torch.no_grad():
        return model(torch.tensor([ids], device=model.device)).logits[0].float()


class PagedRunner:
    """Runs sequences through a model step by step over a paged cache (blocks handed out in
    order, never freed): the smallest engine that exercises the forward contract."""

    def __init__(
        self,
        model: MoeForCausalLM,
        num_blocks: int = 128,
        block_size: int = 4,
        attention_backend: AttentionBackend = "flex",
    ):
        self.model, self.block_size, self.num_blocks = model, block_size, num_blocks
        self.attention_backend, self.device = attention_backend, model.materialised.device
        self.caches = model.allocate_kv_cache(num_blocks, block_size)
        self.tables: dict[str, list[int]] = {}
        self.lens: dict[str, int] = {}
        self.next_block = 0

    def _reserve(self, seq: str, length: int) -> list[int]:
        table = self.tables.setdefault(seq, [])
        while len(table) * self.block_size < length:
            table.append(self.next_block)
            self.next_block += 1
        return table

    def step(self, batch: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """New tokens per sequence -> their logits [q, V]."""
        query_lens, seq_lens, tables, ids, positions = [], [], [], [], []
        for seq, tokens in batch.items():
            start = self.lens.get(seq, 0)
            self.lens[seq] = start + len(tokens)
            query_lens.append(len(tokens))
            seq_lens.append(self.lens[seq])
            tables.append(self._reserve(seq, self.lens[seq]))
            ids.extend(tokens)
            positions.extend(range(start, start + len(tokens)))
        meta = AttentionMetadata.build(
            query_lens,
            seq_lens,
            tables,
            self.block_size,
            self.num_blocks,
            self.attention_backend,
            self.device,
        )
        as_long = lambda xs: torch.tensor(xs, device=self.device)  # noqa: E731
        with torch.inference_mode():  # NOTE: as the engine runs: the same compiled kernels
            hidden = self.model(as_long(ids), as_long(positions), meta, self.caches)
            logits = self.model.compute_logits(hidden)
        return dict(zip(batch, logits.split(query_lens), strict=True))
