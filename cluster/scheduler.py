"""Continuous batching: FCFS queues, token/sequence budgets, chunked prefill, preemption.

Each step, running sequences are served first (in arrival order): a decode token, or the next
chunk of a prompt. A sequence that cannot get a cache block preempts the most recently arrived
running sequence (its blocks are freed; it is recomputed later, first in line). Then waiting
sequences are admitted in arrival order while the budgets and free blocks allow, each starting
after the longest prefix the block manager finds cached.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from moe_serve.cluster.block_manager import BlockManager
from moe_serve.cluster.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")


@dataclass(frozen=True)
class ScheduledSeq:
    """`num_tokens` tokens of `seq`, from `start`, are computed this step; `is_sampling` when
    the chunk reaches the end of the known tokens, so that it yields the next token."""

    seq: Sequence
    start: int
    num_tokens: int
    is_sampling: bool


def _scheduled(seq: Sequence, num_tokens: int) -> ScheduledSeq:
    start = seq.num_computed_tokens
    return ScheduledSeq(seq, start, num_tokens, start + num_tokens == seq.num_tokens)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config, self.blocks = config, blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # since start
        # Prefix cache, over first admissions only (recomputes after preemption left out):
        self.num_queried_tokens = 0  # prompt tokens looked up
        self.num_hit_tokens = 0  # prompt tokens served from the cache

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence, is_first_in_line: bool = False) -> None:
        """Queue `seq` last, or first (a sample of a request already admitted)."""
        seq.status = SequenceStatus.WAITING
        if is_first_in_line:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _chunk(self, num_uncomputed: int, budget: int) -> int:
        """Tokens of `num_uncomputed` to compute within `budget` (0: not this step)."""
        if num_uncomputed <= budget:
            return num_uncomputed
        return budget if self.config.enable_chunked_prefill else 0

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_tokens = self._chunk(seq.num_uncomputed, budget)
            if num_tokens == 0:
                break
            if not self._make_room(seq, seq.num_computed_tokens + num_tokens, out):
                break  # NOTE: seq itself was preempted
            self.blocks.allocate(seq, seq.num_computed_tokens + num_tokens)
            out.scheduled.append(_scheduled(seq, num_tokens))
            budget -= num_tokens
            index += 1
        return budget

    def _make_room(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Preempt the latest arrivals until `seq` fits; False if `seq` had to go itself."""
        while not self.blocks.can_allocate(seq, num_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            cached_ids = self.blocks.lookup(seq)
            num_cached = len(cached_ids) * self.blocks.block_size
            num_tokens = self._chunk(seq.num_tokens - num_cached, budget)
            if num_tokens == 0 or not self.blocks.can_allocate(
                seq, num_cached + num_tokens, cached_ids
            ):
                break  # NOTE: FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.blocks.allocate(seq, num_cached + num_tokens, cached_ids)
            seq.num_computed_tokens = num_cached
            self._count_hit(seq, num_cached)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(_scheduled(seq, num_tokens))
            budget -= num_tokens

    def _count_hit(self, seq: Sequence, num_cached: int) -> None:
        if seq.num_cached_tokens is not None:
            return  # NOTE: a recompute after preemption keeps its first figure
        seq.num_cached_tokens = num_cached
        if self.blocks.enable_prefix_caching:
            self.num_queried_tokens += seq.num_prompt_tokens
            self.num_hit_tokens += num_cached

    def update(self, out: SchedulerOutput, sampled: dict[int, int]) -> None:
        """Advance computed counts, register newly full blocks with the prefix cache, append
        each sampling sequence's new token."""
        for item in out.scheduled:
            item.seq.num_computed_tokens = item.start + item.num_tokens
            self.blocks.register(item.seq)
            if item.is_sampling:
                item.seq.token_ids.append(sampled[item.seq.seq_id])

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove `seq` wherever it is and free its blocks (finish, stop or abort)."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
