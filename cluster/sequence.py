"""One sequence's state as the scheduler sees it (pure Python: no tensors, no text)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Prompt plus generated tokens; `num_computed_tokens` of them are in the KV cache."""

    seq_id: int
    token_ids: list[int]  # prompt followed by generated tokens
    num_prompt_tokens: int
    max_tokens: int  # generated tokens allowed
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    # Prefix caching (cluster/block_manager.py):
    can_hit_cache: bool = True  # False: its prompt must be computed (prompt logprobs)
    num_cached_tokens: int | None = None  # taken from the cache at the first admission
    block_hashes: list[bytes] = field(default_factory=list)  # chain hashes of full blocks so far
    num_registered_blocks: int = 0  # leading block_ids already offered to the cache

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
