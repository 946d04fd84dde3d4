"""Paged attention, both implementations, against dense attention computed here from each
sequence's whole key/value history (no paged cache, no block tables)."""

from __future__ import annotations

import pytest
import torch

from moe_serve.cluster.engine_core import EngineConfig
from moe_serve.models.attention import AttentionMetadata, allocate_kv_cache, paged_attention
from moe_serve.models.paged_flex import check_supported

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, NUM_BLOCKS = 4, 2, 8, 40

# (cached tokens, new tokens[, shares]) per sequence; cached is a count of tokens, or (blocks,
# extra tokens); a sequence that shares reuses the previous one's first two blocks, as prefix
# caching hands them out
LAYOUTS = {
    "mixed": [(0, 7), (9, 1), ((2, 0), 5), ((2, 0), 1, "shares"), (3, 1), (0, 40)],
    "one decode": [(13, 1)],
    "decodes": [(1, 1), ((2, 0), 1), ((2, -1), 1), (30, 1)],
    "one prefill": [(0, 5)],
    "prefill after context": [((2, 1), 3), ((3, 0), 35)],
}


def _length(spec: int | tuple[int, int], block_size: int) -> int:
    return spec if isinstance(spec, int) else spec[0] * block_size + spec[1]


def _layout(name: str, block_size: int, generator: torch.Generator):
    """Per sequence: (cached, new, block table, keys, values) with keys/values [len, Hkv, D]."""
    free = torch.randperm(NUM_BLOCKS, generator=generator).tolist()
    sequences = []
    for cached_spec, new, *shares in LAYOUTS[name]:
        cached = _length(cached_spec, block_size)
        length = cached + new
        keys = torch.randn(length, NUM_KV_HEADS, HEAD_DIM, generator=generator)
        values = torch.randn(length, NUM_KV_HEADS, HEAD_DIM, generator=generator)
        table = [free.pop() for _ in range(-(-length // block_size))]
        if shares:
            _, _, donor_table, donor_keys, donor_values = sequences[-1]
            table[:2] = donor_table[:2]
            shared = slice(0, 2 * block_size)
            keys[shared], values[shared] = donor_keys[shared], donor_values[shared]
        sequences.append((cached, new, table, keys, values))
    return sequences


def _dense(query, keys, values, cached: int) -> torch.Tensor:
    """query [new, Hq, D] at positions cached.., keys/values [cached + new, Hkv, D]."""
    group = NUM_HEADS // NUM_KV_HEADS
    k = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, L, D]
    v = values.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = query.transpose(0, 1) @ k.transpose(1, 2) * HEAD_DIM**-0.5  # [Hq, new, L]
    positions = torch.arange(keys.shape[0])
    is_visible = positions[None, :] <= cached + torch.arange(query.shape[0])[:, None]
    scores = scores.masked_fill(~is_visible, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1)


@pytest.mark.parametrize("backend", ["flex", "sdpa"])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_paged_attention_matches_dense_attention(layout: str, block_size: int, backend: str):
    generator = torch.Generator().manual_seed(len(layout) * block_size)
    sequences = _layout(layout, block_size, generator)
    (cache,) = allocate_kv_cache(1, NUM_BLOCKS, block_size, NUM_KV_HEADS, HEAD_DIM, torch.float32)
    # NOTE: garbage in every slot: reading a slot a sequence does not own changes its output
    cache.key.uniform_(-30, 30, generator=generator)
    cache.value.uniform_(-30, 30, generator=generator)
    queries, new_keys, new_values = [], [], []
    for cached, new, table, keys, values in sequences:
        for position in range(cached):  # the context earlier steps wrote
            block, offset = table[position // block_size], position % block_size
            cache.key[block, offset], cache.value[block, offset] = keys[position], values[position]
        queries.append(torch.randn(new, NUM_HEADS, HEAD_DIM, generator=generator))
        new_keys.append(keys[cached:])
        new_values.append(values[cached:])
    meta = AttentionMetadata.build(
        [new for _, new, *_ in sequences],
        [cached + new for cached, new, *_ in sequences],
        [table for _, _, table, *_ in sequences],
        block_size,
        NUM_BLOCKS,
        backend,
    )
    out = paged_attention(
        torch.cat(queries), torch.cat(new_keys), torch.cat(new_values), cache, meta, HEAD_DIM**-0.5
    )
    expected = [
        _dense(query, keys, values, cached)
        for query, (cached, _, _, keys, values) in zip(queries, sequences, strict=True)
    ]
    torch.testing.assert_close(out, torch.cat(expected), atol=1e-5, rtol=1e-5)


def test_unknown_attention_backend_is_refused():
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        EngineConfig(attention_backend="paged")


def test_flex_on_cuda_refuses_what_triton_cannot_compile():
    cuda = torch.device("cuda")  # NOTE: the check reads the device's type; no GPU needed
    check_supported(cuda, 16, 16)
    check_supported(cuda, 128, 32)
    for head_dim, block_size in ((8, 16), (64, 8), (64, 24)):
        with pytest.raises(
            ValueError, match=f"head dim is {head_dim} and block_size is {block_size}"
        ):
            check_supported(cuda, head_dim, block_size)
    check_supported(torch.device("cpu"), 4, 3)  # the C++ kernel takes any shape
