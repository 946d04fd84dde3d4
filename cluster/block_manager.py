"""Paged KV-cache block accounting with automatic prefix caching.

Blocks are reference-counted: sequences with a common prefix share its full blocks. A full block
whose slots have all been computed is registered under the hash of its tokens and of every token
before it (a chain: `hash_block(parent_hash, tokens)`), so a later sequence starting with the
same tokens takes it instead of recomputing it. A freed registered block keeps its contents and
stays findable until it is evicted: free blocks never registered are handed out first, then
registered ones in least-recently-freed order.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from collections.abc import Collection

from moe_serve.cluster.sequence import Sequence

ROOT_HASH = b""


def hash_block(parent_hash: bytes, token_ids: list[int]) -> bytes:
    """SHA-256 of the parent block's hash and this block's tokens.

    NOTE: a strong hash, so a hit is not checked against the tokens: a collision (a block
    served with another prompt's contents) would need a SHA-256 collision. The key holds the
    tokens and, through the chain, their positions; everything else a block's contents depend
    on (weights, dtype, block size, RoPE settings) is fixed for the engine that owns the cache,
    and the cache dies with the engine. Dynamic NTK RoPE is the one exception (contents depend
    on the sequence length when computed): see `max_cacheable_len`.
    """
    return hashlib.sha256(parent_hash + struct.pack(f"<{len(token_ids)}q", *token_ids)).digest()


class BlockManager:
    """Hands out cache blocks on demand and takes them back on finish, abort or preemption.

    `max_cacheable_len`: with dynamic NTK RoPE, tokens of a sequence longer than this are
    rotated for that length, so only blocks computed while their sequence was within it are
    registered, and only sequences within it take hits (None: no limit).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        max_cacheable_len: int | None = None,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of one slot ({num_blocks=}, {block_size=})")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.max_cacheable_len = max_cacheable_len
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.empty_block_ids: deque[int] = deque(range(num_blocks))  # free, not registered
        self.evictable_block_ids: OrderedDict[int, None] = OrderedDict()  # free, registered, LRU
        self.cached_block_ids: dict[bytes, int] = {}  # hash -> registered block
        self.num_evictions = 0  # since start

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (registered ones included: they can be evicted)."""
        return len(self.empty_block_ids) + len(self.evictable_block_ids)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs to hold `num_tokens` tokens in all."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_ids))

    def can_allocate(
        self, seq: Sequence, num_tokens: int, cached_ids: Collection[int] = ()
    ) -> bool:
        """Whether `seq`, after taking the blocks `cached_ids` from `lookup`, fits `num_tokens`."""
        num_revived = sum(self.ref_counts[b] == 0 for b in cached_ids)
        num_new = max(0, -(-num_tokens // self.block_size) - len(seq.block_ids) - len(cached_ids))
        return num_new + num_revived <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int, cached_ids: Collection[int] = ()) -> None:
        """Grow `seq`'s block table to hold `num_tokens` tokens, starting from the cached blocks
        `cached_ids` (from `lookup`, for a sequence that holds no block yet)."""
        if not self.can_allocate(seq, num_tokens, cached_ids):
            raise RuntimeError(
                f"sequence {seq.seq_id} needs more than the {self.num_free_blocks} free blocks"
            )
        for block_id in cached_ids:
            if self.ref_counts[block_id] == 0:
                del self.evictable_block_ids[block_id]
            self.ref_counts[block_id] += 1
        seq.block_ids.extend(cached_ids)
        seq.num_registered_blocks += len(cached_ids)
        needed = self.blocks_needed(seq, num_tokens)
        seq.block_ids.extend(self._take_free_block() for _ in range(needed))

    def _take_free_block(self) -> int:
        if self.empty_block_ids:
            block_id = self.empty_block_ids.popleft()
        else:
            block_id, _ = self.evictable_block_ids.popitem(last=False)
            del self.cached_block_ids[self.block_hashes[block_id]]
            self.block_hashes[block_id] = None
            self.num_evictions += 1
        self.ref_counts[block_id] = 1
        return block_id

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; blocks left unreferenced become free (registered ones stay
        findable). NOTE: last block first, so a prefix's tail is evicted before its head."""
        for block_id in reversed(seq.block_ids):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] > 0:
                continue
            if self.block_hashes[block_id] is None:
                self.empty_block_ids.append(block_id)
            else:
                self.evictable_block_ids[block_id] = None
        seq.block_ids, seq.num_registered_blocks = [], 0

    def is_cacheable(self, num_tokens: int) -> bool:
        """Whether blocks of a sequence of `num_tokens` tokens may be registered or hit."""
        limit = self.max_cacheable_len
        return self.enable_prefix_caching and (limit is None or num_tokens <= limit)

    def lookup(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest prefix of `seq` (which holds no block yet).

        NOTE: at most num_tokens - 1 tokens, rounded down to full blocks: the last token is
        always computed, since its logits give the next token.
        """
        if not (seq.can_hit_cache and self.is_cacheable(seq.num_tokens)):
            return []
        num_blocks = (seq.num_tokens - 1) // self.block_size
        self._hash_blocks(seq, num_blocks)
        block_ids = []
        for block_hash in seq.block_hashes[:num_blocks]:
            block_id = self.cached_block_ids.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def register(self, seq: Sequence) -> None:
        """Register `seq`'s blocks that are full and computed (after each step that computes)."""
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_registered_blocks or not self.is_cacheable(seq.num_computed_tokens):
            return
        self._hash_blocks(seq, num_full)
        for index in range(seq.num_registered_blocks, num_full):
            block_id, block_hash = seq.block_ids[index], seq.block_hashes[index]
            # NOTE: a duplicate (same prefix computed by two sequences at once) stays unregistered
            if block_hash not in self.cached_block_ids:
                self.cached_block_ids[block_hash] = block_id
                self.block_hashes[block_id] = block_hash
        seq.num_registered_blocks = num_full

    def _hash_blocks(self, seq: Sequence, num_blocks: int) -> None:
        """Extend `seq.block_hashes` to its first `num_blocks` full blocks."""
        hashes, size = seq.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            start = len(hashes) * size
            parent = hashes[-1] if hashes else ROOT_HASH
            hashes.append(hash_block(parent, seq.token_ids[start : start + size]))
