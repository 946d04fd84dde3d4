"""Paged attention by gathering: each step copies the context it reads out of the paged cache
into contiguous tensors and runs SDPA (decode with a boolean length mask, prefill one sequence
at a time). The baseline the in-place flex path (`paged_flex`) is measured and tested against.

Shapes: B sequences, T new tokens, Hq query heads, Hkv kv heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SdpaPlan:
    """Which sequences decode (one batched call) and which prefill (one call each)."""

    block_tables: torch.Tensor  # [B, max_blocks] long: cache blocks of each sequence
    decode_rows: torch.Tensor  # [Bd] long: sequences with one new token (batched path)
    decode_token_ids: torch.Tensor  # [Bd] long: their token index in the flat batch
    decode_mask: torch.Tensor  # [Bd, Lmax] bool: which gathered slots hold their context
    prefill_ids: tuple[int, ...]  # sequences with more than one new token

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        query_starts: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        device: torch.device | str,
    ) -> SdpaPlan:
        width = max((len(t) for t in block_tables), default=0)
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        decode_rows = [b for b, q in enumerate(query_lens) if q == 1]
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        return cls(
            block_tables=as_long(padded).view(len(block_tables), width),
            decode_rows=as_long(decode_rows),
            decode_token_ids=as_long([query_starts[b] for b in decode_rows]),
            decode_mask=_length_mask([seq_lens[b] for b in decode_rows], device),
            prefill_ids=tuple(b for b, q in enumerate(query_lens) if q > 1),
        )


def _length_mask(lengths: list[int], device: torch.device | str) -> torch.Tensor:
    """[B, max(lengths)] bool, True where position < length."""
    positions = torch.arange(max(lengths, default=0), device=device)
    return positions[None, :] < torch.tensor(lengths, device=device)[:, None]


def sdpa_paged_attention(query, key, value, cache, meta, scale: float) -> torch.Tensor:
    """query [T, Hq, D], new key/value [T, Hkv, D] (already in the cache) -> [T, Hq, D]."""
    plan: SdpaPlan = meta.sdpa
    if not plan.prefill_ids:  # NOTE: pure decode step: tokens are in sequence order already
        return _decode_attention(query, cache, plan, scale)
    out = torch.empty_like(query)
    if plan.decode_rows.numel():
        out[plan.decode_token_ids] = _decode_attention(
            query[plan.decode_token_ids], cache, plan, scale
        )
    for b in plan.prefill_ids:
        start, q_len, s_len = meta.query_starts[b], meta.query_lens[b], meta.seq_lens[b]
        rows = slice(start, start + q_len)
        if q_len == s_len:  # NOTE: no cached context: attend to the new tokens directly
            k, v = key[rows], value[rows]
        else:
            k, v = _gather(cache, plan.block_tables[b : b + 1], s_len)
            k, v = k[0], v[0]
        out[rows] = _prefill_attention(query[rows], k, v, s_len - q_len, scale)
    return out


def _gather(cache, block_tables: torch.Tensor, length: int):
    """Contiguous key/value [B, length, Hkv, D] read through block tables [B, nb]."""
    batch, num_blocks = block_tables.shape[0], cache.key.shape[0]
    num_kv_heads, head_dim = cache.key.shape[2:]
    flat_ids = block_tables.flatten()
    # NOTE: index_select over whole blocks is a row memcpy: ~10x faster than 4-D indexing.
    k = cache.key.view(num_blocks, -1).index_select(0, flat_ids)
    v = cache.value.view(num_blocks, -1).index_select(0, flat_ids)
    shape = (batch, -1, num_kv_heads, head_dim)
    return k.view(shape)[:, :length], v.view(shape)[:, :length]


def _prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int, scale: float
) -> torch.Tensor:
    """q [L, Hq, D] at positions offset.., k/v [offset + L, Hkv, D] -> [L, Hq, D]."""
    q_len, kv_len = q.shape[0], k.shape[0]
    mask = None
    if offset:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(offset)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=mask,
        is_causal=not offset,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1)


def _decode_attention(q: torch.Tensor, cache, plan: SdpaPlan, scale: float) -> torch.Tensor:
    """q [Bd, Hq, D], one token per decode sequence -> [Bd, Hq, D].

    NOTE: measured on CPU: SDPA over the gathered [Bd, L, Hkv, D] views transposed runs 4x
    slower than over contiguous [Bd, Hkv, L, D], and bf16 SDPA 4x slower than float32, so
    keys and values are copied once into that layout (in float32 on CPU).
    """
    mask = plan.decode_mask
    k, v = _gather(cache, plan.block_tables[plan.decode_rows], mask.shape[1])
    dtype = torch.float32 if q.device.type == "cpu" else q.dtype
    k, v = (x.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format) for x in (k, v))
    out = F.scaled_dot_product_attention(
        q.to(dtype)[:, :, None, :],
        k,
        v,
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[:, :, 0, :].to(q.dtype)
