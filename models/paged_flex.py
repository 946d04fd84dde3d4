"""Paged attention that reads the KV cache in place: PyTorch's `flex_attention` over the whole
cache pool, with a block mask built from the block tables (no gather, no boolean mask tensor).
The same code compiles to a C++ kernel on CPU and a Triton kernel on CUDA.

The pool [N, S, Hkv, D] is viewed as one sequence [1, Hkv, N * S, D]. A step's
`slot_positions` (a power of two >= N * S) holds, for every slot of every block the step reads,
the position in its sequence of the token stored there, and NOT_FILLED for slots past a
sequence's end. One value per slot is
enough: only full blocks are shared between sequences (prefix caching), and a shared block holds
the same positions in every sequence that shares it.

A group of G sequences attends in one call, with query [G, Hq, Lq, D]:
- decode (one new token per sequence, Lq = 1): a row reads its blocks' filled slots;
- prefill: a row's queries sit at their positions in the sequence (Lq = the longest sequence;
  tiles of Q_BLOCK positions before the new tokens read nothing and cost nothing), so causality
  is `slot position <= query index` and no per-row value is needed inside the kernel.
Row g of the block mask lists, for each tile, sequence g's blocks the tile may read: those wholly
at or before the tile's first query as full blocks (no mask evaluated), the others as partial.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

Q_BLOCK = 32  # NOTE: measured on CPU for 512-token prefills: 32 beats 64 and 128 (8.0/8.8/10.9 ms)
NOT_FILLED = torch.iinfo(torch.int32).max


# NOTE: imported when first used, not with this module: flex_attention brings in dynamo and
# inductor (~1 s of CPU), which the processes that never attend (expert shards, the Serve
# fronts) would otherwise pay at every start
@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


# NOTE: dynamo compiles variants per dtype, head layout and block size (a set per model); a
# server hosting several models needs more than the default 8, and hitting the limit must fail
# loudly: past it dynamo silently runs a path that ignores the block mask's sparsity (wrong
# results here). Dynamo's settings are per thread in torch 2.13, hence set in each calling thread.
_RECOMPILE_LIMIT = 64
_thread_state = threading.local()


def _configure_dynamo_in_this_thread() -> None:
    if not getattr(_thread_state, "is_configured", False):
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, _RECOMPILE_LIMIT)
        config.fail_on_recompile_limit_hit = True
        _thread_state.is_configured = True


# NOTE: dynamo specialises a dynamic size of 1, and a tile count of 1 bounds the query length at
# Q_BLOCK: one sequence alone and one tile alone would each compile a variant of their own (about
# 5 s each on CPU). Groups get a padding row with no blocks when they hold one sequence, and
# prefills at least two tiles, which leaves two variants per model: decode and prefill.
_MIN_ROWS, _MIN_PREFILL_TILES = 2, 2


# NOTE: on CUDA flex compiles to Triton, whose matrix products need every dimension >= 16: the
# head dim (query x key) and the KV tile, a divisor of the cache block (scores x value)
MIN_CUDA_TILE = 16


def check_supported(device: torch.device, head_dim: int, block_size: int) -> None:
    """Refuse, with the way out, what the compiled kernel cannot run on `device`, before the
    first compile fails with a Triton error."""
    if device.type == "cuda" and (head_dim < MIN_CUDA_TILE or block_size % MIN_CUDA_TILE):
        raise ValueError(
            f"attention_backend 'flex' on CUDA needs a head dim of at least {MIN_CUDA_TILE} and "
            f"a block_size that is a multiple of {MIN_CUDA_TILE} (Triton's matrix products); "
            f"this model's head dim is {head_dim} and block_size is {block_size}: set "
            f"block_size to a multiple of {MIN_CUDA_TILE}, or attention_backend: sdpa"
        )


def kernel_options(device: torch.device, block_size: int) -> dict[str, int] | None:
    """On CUDA, Triton tiles that divide the block mask's blocks: Q_BLOCK query rows, and the
    largest of 64/32/16 keys dividing the cache block (flex's default KV tile, 64 and more,
    would not divide a block of 16 or 32)."""
    if device.type != "cuda":
        return None
    tile_n = next(n for n in (64, 32, MIN_CUDA_TILE) if block_size % n == 0)
    return {"BLOCK_M": min(Q_BLOCK, 64), "BLOCK_N": tile_n}


def slot_positions(
    seq_lens: list[int], block_tables: list[list[int]], num_blocks: int, block_size: int, device
) -> torch.Tensor:
    """[P] int32, P >= N * S: each filled slot's position in its sequence, NOT_FILLED elsewhere.

    NOTE: P is static, a power of two: with a dynamic size, torch 2.13's C++ flex template
    names the size in its index check after an undeclared loop bound (`cur_qSplitSize8`, a
    compile error); a power of two keeps the number of compiled variants small."""
    size = 1 << (num_blocks * block_size - 1).bit_length()
    out = torch.full((size,), NOT_FILLED, dtype=torch.int32, device=device)
    torch._dynamo.mark_static(out)
    width = max(len(t) for t in block_tables)
    padded = [t + [num_blocks] * (width - len(t)) for t in block_tables]
    tables = torch.tensor(padded, device=device)
    positions = torch.arange(width * block_size, device=device)
    slots = (tables * block_size)[:, positions // block_size] + positions % block_size
    is_filled = positions[None, :] < torch.tensor(seq_lens, device=device)[:, None]
    out.scatter_(0, slots[is_filled], positions.to(torch.int32).expand_as(slots)[is_filled])
    return out


@dataclass(frozen=True)
class FlexGroup:
    """Sequences whose new tokens attend in one flex_attention call."""

    token_ids: torch.Tensor  # [G, Lq] long: flat-batch index of each query (padding repeats)
    real_rows: torch.Tensor  # [Gr] long: each real query's row of [G * Lq] (not padding)
    real_token_ids: torch.Tensor  # [Gr] long: flat-batch index of each real query, in order
    block_mask: BlockMask
    kernel_options: dict[str, int] | None  # Triton tiles on CUDA (`kernel_options`)

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        query_starts: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        positions: torch.Tensor,
        num_blocks: int,
        block_size: int,
    ) -> FlexGroup:
        """The group's queries and block mask from Python lists (one entry per sequence) and
        the step's `slot_positions`. One query per sequence makes a decode group."""
        device = positions.device
        is_decode = max(query_lens) == 1
        if len(query_lens) < _MIN_ROWS:  # NOTE: one padding row, with no blocks
            query_lens, query_starts = [*query_lens, 0], [*query_starts, 0]
            seq_lens, block_tables = [*seq_lens, 0], [*block_tables, [num_blocks - 1]]
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        lens, ends = as_long(query_lens), as_long(seq_lens)
        starts = ends - lens  # position of each sequence's first new token
        query_starts = as_long(query_starts)
        if is_decode:
            num_queries, is_real = 1, lens[:, None] > 0
            token_ids = torch.where(is_real, query_starts[:, None], 0)
        else:
            num_queries = int(ends.max())
            token_ids, is_real = padded_queries(query_starts, starts, ends, num_queries)
        width = max(len(t) for t in block_tables)
        tables = as_long([t + [0] * (width - len(t)) for t in block_tables])
        if is_decode:
            first = last = (ends - 1)[:, None]
            mask_mod = _filled(positions)
        else:
            num_tiles = max(-(-num_queries // Q_BLOCK), _MIN_PREFILL_TILES)
            tile = torch.arange(num_tiles, device=device)[None, :] * Q_BLOCK
            first = torch.maximum(tile, starts[:, None])
            last = torch.minimum(tile + Q_BLOCK, ends[:, None]) - 1
            mask_mod = _causal(positions)
        from torch.nn.attention.flex_attention import BlockMask

        block_mask = BlockMask.from_kv_blocks(
            *_block_lists(tables, first, last, num_blocks, block_size),
            BLOCK_SIZE=(Q_BLOCK, block_size),
            mask_mod=mask_mod,
            seq_lengths=(num_queries, num_blocks * block_size),
            compute_q_blocks=False,
        )
        options = kernel_options(device, block_size)
        return cls(token_ids, *real_queries(token_ids, is_real), block_mask, options)


def real_queries(token_ids: torch.Tensor, is_real: torch.Tensor):
    """Padded queries [G, L] and which are real -> the real ones' rows of the flattened [G * L]
    and their flat-batch indices, [Gr] long each. NOTE: a host sync (the count sizes them):
    once per step, when the step's metadata is built."""
    real_rows = is_real.flatten().nonzero().squeeze(1)
    return real_rows, token_ids.flatten()[real_rows]


def padded_queries(query_starts, starts, ends, num_queries: int):
    """Queries laid out at their positions in their sequences, [G, num_queries]: the flat-batch
    index of each (padding: 0) and whether it is real (position in starts..ends - 1)."""
    index = torch.arange(num_queries, device=starts.device)[None, :]
    is_real = (index >= starts[:, None]) & (index < ends[:, None])
    token_ids = torch.where(is_real, query_starts[:, None] + index - starts[:, None], 0)
    return token_ids, is_real


def _block_lists(tables, first, last, num_blocks: int, block_size: int):
    """(partial counts, partial ids, full counts, full ids) per query tile, [G, 1, tiles(, N)],
    for tiles whose queries span positions first..last of their sequence (none if first > last)."""
    is_used = first <= last
    num_full = torch.where(is_used, (first + 1) // block_size, 0)
    num_all = torch.where(is_used, last // block_size + 1, 0)
    columns = torch.arange(tables.shape[1], device=tables.device)
    rows = tables[:, None, :].expand(-1, first.shape[1], -1)  # [G, tiles, W]
    full = torch.where(columns < num_full[..., None], rows, 0)
    shifted = torch.gather(rows, 2, (columns + num_full[..., None]).clamp(max=tables.shape[1] - 1))
    partial = torch.where(columns < (num_all - num_full)[..., None], shifted, 0)

    def padded(ids: torch.Tensor) -> torch.Tensor:  # NOTE: flex wants one column per kv block
        out = torch.zeros(*ids.shape[:2], num_blocks, dtype=torch.int32, device=ids.device)
        out[..., : ids.shape[2]] = ids
        return out[:, None]

    as_count = lambda n: n.to(torch.int32)[:, None]  # noqa: E731
    return as_count(num_all - num_full), padded(partial), as_count(num_full), padded(full)


def _filled(positions: torch.Tensor):
    def mask_mod(b, h, q_idx, kv_idx):
        return positions[kv_idx] != NOT_FILLED

    return mask_mod


def _causal(positions: torch.Tensor):
    def mask_mod(b, h, q_idx, kv_idx):
        return positions[kv_idx] <= q_idx

    return mask_mod


def flex_paged_attention(
    query: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    group: FlexGroup,
    scale: float,
) -> torch.Tensor:
    """query [T, Hq, D] (flat batch), pools [N, S, Hkv, D] -> [Gr, Hq, D] for the group's real
    queries, in (sequence, position) order."""
    _configure_dynamo_in_this_thread()
    num_kv_heads, head_dim = key_pool.shape[2:]
    as_sequence = lambda pool: pool.view(-1, num_kv_heads, head_dim).transpose(0, 1)[None]  # noqa: E731
    # NOTE: the query is scaled here rather than by flex: a scale argument is a constant of the
    # compiled kernel, and each distinct one would compile variants of its own
    out = _compiled_flex()(
        query[group.token_ids].transpose(1, 2) * scale,  # [G, Hq, Lq, D]
        as_sequence(key_pool),
        as_sequence(value_pool),
        block_mask=group.block_mask,
        scale=1.0,
        enable_gqa=query.shape[1] != num_kv_heads,
        kernel_options=group.kernel_options,
    )
    # NOTE: rows by index, not by boolean mask: no host sync in the per-layer loop
    return out.transpose(1, 2).flatten(0, 1)[group.real_rows]


def warm_up(key_pool: torch.Tensor, num_heads: int, block_size: int) -> None:
    """Compile the decode and prefill kernels for this cache now (about 5 s each on CPU the
    first time on a machine), so that no step compiles: a step that did would stall the
    expert shards waiting in its collectives. Reads the pool, writes nothing."""
    num_blocks, head_dim = key_pool.shape[0], key_pool.shape[3]
    with torch.inference_mode():
        positions = slot_positions([2], [[0]], num_blocks, block_size, key_pool.device)
        query = torch.zeros(2, num_heads, head_dim, dtype=key_pool.dtype, device=key_pool.device)
        for query_lens in ([1], [2]):  # NOTE: decode, then prefill
            group = FlexGroup.build(query_lens, [0], [2], [[0]], positions, num_blocks, block_size)
            flex_paged_attention(query, key_pool, key_pool, group, 1.0)
