"""Attention over a paged KV cache for a flattened batch of variable-length sequences.

Shapes: B sequences, T = sum(query_lens) new tokens, Hq query heads, Hkv kv heads, D head dim,
N cache blocks of S slots each. Two implementations read the cache: "flex" (`paged_flex`,
the default) reads blocks in place through the block tables; "sdpa" (`paged_sdpa`) gathers
each step's context into contiguous copies, the baseline it is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from moe_serve.models.paged_flex import (
    FlexGroup,
    flex_paged_attention,
    padded_queries,
    real_queries,
    slot_positions,
)
from moe_serve.models.paged_sdpa import SdpaPlan, sdpa_paged_attention

AttentionBackend = Literal["flex", "sdpa"]


@dataclass(frozen=True)
class LayerKVCache:
    """One layer's paged cache: key and value [N, S, Hkv, D]."""

    key: torch.Tensor
    value: torch.Tensor


def allocate_kv_cache(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> list[LayerKVCache]:
    """Zeroed paged KV cache for every layer."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return [
        LayerKVCache(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )
        for _ in range(num_layers)
    ]


@dataclass(frozen=True)
class AttentionMetadata:
    """Where each sequence's new tokens sit in the flat batch and in the paged cache, built once
    per step for every layer.

    Sequences are laid out in order; sequence b owns tokens
    [query_starts[b], query_starts[b] + query_lens[b]) of the flat batch.
    """

    query_lens: tuple[int, ...]  # new tokens per sequence
    query_starts: tuple[int, ...]  # where each sequence's new tokens start in the flat batch
    seq_lens: tuple[int, ...]  # tokens in the cache after this step (context + new)
    slot_mapping: torch.Tensor  # [T] long: flat cache slot (block * S + offset) per new token
    token_seq_lens: torch.Tensor  # [T] long: seq_lens of each token's sequence (dynamic RoPE)
    flex_groups: tuple[FlexGroup, ...]  # "flex": decode sequences, then prefills with context
    fresh_prefills: FreshPrefills | None  # "flex": prefills with nothing cached
    sdpa: SdpaPlan | None  # "sdpa": the gather plan

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        num_blocks: int,
        backend: AttentionBackend = "flex",
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Metadata from per-sequence lengths and block tables (Python lists) of a cache of
        `num_blocks` blocks."""
        slots: list[int] = []
        for q_len, s_len, table in zip(query_lens, seq_lens, block_tables, strict=True):
            if q_len > s_len or len(table) * block_size < s_len:
                raise ValueError(
                    f"sequence of {s_len} tokens ({q_len} new) does not fit "
                    f"its {len(table)} blocks of {block_size}"
                )
            slots.extend(
                table[p // block_size] * block_size + p % block_size
                for p in range(s_len - q_len, s_len)
            )
        starts = [0]
        for q_len in query_lens:
            starts.append(starts[-1] + q_len)
        starts.pop()
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        lists = (query_lens, starts, seq_lens, block_tables)
        return cls(
            query_lens=tuple(query_lens),
            query_starts=tuple(starts),
            seq_lens=tuple(seq_lens),
            slot_mapping=as_long(slots),
            token_seq_lens=as_long(
                [s for q, s in zip(query_lens, seq_lens, strict=True) for _ in range(q)]
            ),
            flex_groups=_flex_groups(*lists, num_blocks, block_size, device)
            if backend == "flex"
            else (),
            fresh_prefills=FreshPrefills.build(query_lens, starts, seq_lens, device)
            if backend == "flex"
            else None,
            sdpa=SdpaPlan.build(*lists, device) if backend == "sdpa" else None,
        )


def _is_fresh(query_len: int, seq_len: int) -> bool:
    """A prefill with nothing cached before its new tokens."""
    return 1 < query_len == seq_len


@dataclass(frozen=True)
class FreshPrefills:
    """Prefilling sequences with nothing cached attend to their own new keys only: one causal
    SDPA call over them right-padded to the longest. Padding keys sit after every real query,
    so causality hides them: no mask. NOTE: measured on CPU, SDPA's flash kernel is 2.3-3x
    faster than the flex kernel for such prefills (docs/performance.md)."""

    token_ids: torch.Tensor  # [G, L] long: flat-batch index of each query (padding repeats)
    real_rows: torch.Tensor  # [Gr] long: rows of the flattened [G * L] that are real
    real_token_ids: torch.Tensor  # [Gr] long

    @classmethod
    def build(cls, query_lens, starts, seq_lens, device) -> FreshPrefills | None:
        ids = [
            b for b, (q, s) in enumerate(zip(query_lens, seq_lens, strict=True)) if _is_fresh(q, s)
        ]
        if not ids:
            return None
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        lens = as_long([query_lens[b] for b in ids])
        first = torch.zeros_like(lens)
        query_starts = as_long([starts[b] for b in ids])
        longest = max(query_lens[b] for b in ids)  # NOTE: from the host's list: no sync
        token_ids, is_real = padded_queries(query_starts, first, lens, longest)
        return cls(token_ids, *real_queries(token_ids, is_real))

    def attend(self, query, key, value, scale: float) -> torch.Tensor:
        """query [T, Hq, D], new key/value [T, Hkv, D] -> [Gr, Hq, D]."""
        q, k, v = (x[self.token_ids].transpose(1, 2) for x in (query, key, value))
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
        return out.transpose(1, 2).flatten(0, 1)[self.real_rows]


def _flex_groups(query_lens, starts, seq_lens, block_tables, num_blocks, block_size, device):
    """One group of the decoding sequences and one of the prefilling ones with cached context
    (either may be missing), so that a decode row is never padded to a prefill's length."""
    positions = slot_positions(seq_lens, block_tables, num_blocks, block_size, device)
    groups = []
    for is_decode in (True, False):
        ids = [
            b
            for b, (q, s) in enumerate(zip(query_lens, seq_lens, strict=True))
            if (q == 1) == is_decode and not _is_fresh(q, s)
        ]
        if ids:
            lists = [[xs[b] for b in ids] for xs in (query_lens, starts, seq_lens, block_tables)]
            groups.append(FlexGroup.build(*lists, positions, num_blocks, block_size))
    return tuple(groups)


def write_kv(
    cache: LayerKVCache, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store new key/value [T, Hkv, D] at their slots."""
    num_kv_heads, head_dim = key.shape[1:]
    cache.key.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    cache.value.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache: LayerKVCache,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of new tokens over their sequence's cached context.

    query [T, Hq, D], key/value [T, Hkv, D] (new tokens, written to the cache here) -> [T, Hq, D].
    """
    write_kv(cache, key, value, meta.slot_mapping)
    if meta.sdpa is not None:
        return sdpa_paged_attention(query, key, value, cache, meta, scale)
    groups, fresh = meta.flex_groups, meta.fresh_prefills
    if len(groups) == 1 and fresh is None:  # NOTE: one group holds every token, in order
        return flex_paged_attention(query, cache.key, cache.value, groups[0], scale)
    if not groups and fresh is not None and fresh.real_token_ids.shape[0] == query.shape[0]:
        return fresh.attend(query, key, value, scale)
    out = torch.empty_like(query)
    for group in groups:
        out[group.real_token_ids] = flex_paged_attention(
            query, cache.key, cache.value, group, scale
        )
    if fresh is not None:
        out[fresh.real_token_ids] = fresh.attend(query, key, value, scale)
    return out
