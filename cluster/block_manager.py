"""Paged KV-cache block accounting: fixed-size blocks, one block table per sequence."""

from __future__ import annotations

from collections import deque

from cluster.sequence import Sequence


class BlockManager:
    """Hands out cache blocks on demand and takes them back on finish, abort or preemption."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of one slot ({num_blocks=}, {block_size=})")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_block_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs to hold `num_tokens` tokens in all."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_ids))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq`'s block table to hold `num_tokens` tokens."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(
                f"sequence {seq.seq_id} needs {needed} blocks, {self.num_free_blocks} free"
            )
        seq.block_ids.extend(self.free_block_ids.popleft() for _ in range(needed))

    def free(self, seq: Sequence) -> None:
        self.free_block_ids.extend(seq.block_ids)
        seq.block_ids = []
