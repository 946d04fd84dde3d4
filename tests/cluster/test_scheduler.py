"""Scheduler and block manager without a model: hand-built sequences and sampled tokens."""

from __future__ import annotations

import itertools

from moe_serve.cluster.block_manager import BlockManager
from moe_serve.cluster.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from moe_serve.cluster.sequence import Sequence, SequenceStatus

_ids = itertools.count()


def make_seq(prompt_len: int, max_tokens: int = 100) -> Sequence:
    return Sequence(next(_ids), list(range(prompt_len)), prompt_len, max_tokens)


def make_scheduler(num_blocks=64, block_size=4, prefix_caching=False, **config) -> Scheduler:
    """NOTE: prefix caching off unless asked: make_seq's prompts all share their tokens."""
    blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    return Scheduler(SchedulerConfig(**config), blocks)


def run_step(scheduler: Scheduler, token: int = 7) -> SchedulerOutput:
    """Schedule, then feed every sampling sequence the same token."""
    out = scheduler.schedule()
    sampled = {item.seq.seq_id: token for item in out.scheduled if item.is_sampling}
    scheduler.update(out, sampled)
    return out


def chunks(out: SchedulerOutput) -> list[tuple[int, int, int]]:
    return [(item.seq.seq_id, item.start, item.num_tokens) for item in out.scheduled]


def test_new_requests_join_between_steps_and_decode_together():
    scheduler = make_scheduler()
    a, b = make_seq(5), make_seq(3)
    scheduler.add(a)
    assert chunks(run_step(scheduler)) == [(a.seq_id, 0, 5)]
    scheduler.add(b)
    out = run_step(scheduler)  # a decodes while b prefills, in one step
    assert chunks(out) == [(a.seq_id, 5, 1), (b.seq_id, 0, 3)]
    assert all(item.is_sampling for item in out.scheduled)
    assert chunks(run_step(scheduler)) == [(a.seq_id, 6, 1), (b.seq_id, 3, 1)]
    assert a.output_ids == [7, 7, 7] and b.output_ids == [7, 7]


def test_finished_sequences_leave_and_free_their_blocks():
    scheduler = make_scheduler(num_blocks=8)
    a, b = make_seq(6), make_seq(2)
    scheduler.add(a)
    scheduler.add(b)
    run_step(scheduler)
    assert scheduler.blocks.num_free_blocks == 8 - 2 - 1
    scheduler.finish(a, "stop")
    assert a.status is SequenceStatus.FINISHED and a.block_ids == []
    assert chunks(run_step(scheduler)) == [(b.seq_id, 2, 1)]
    scheduler.finish(b, "abort")
    assert scheduler.blocks.num_free_blocks == 8 and not scheduler.has_unfinished


def test_max_num_seqs_caps_the_running_set():
    scheduler = make_scheduler(max_num_seqs=2)
    seqs = [make_seq(2) for _ in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    assert [c[0] for c in chunks(run_step(scheduler))] == [seqs[0].seq_id, seqs[1].seq_id]
    scheduler.finish(seqs[0], "stop")
    assert [c[0] for c in chunks(run_step(scheduler))] == [seqs[1].seq_id, seqs[2].seq_id]


def test_token_budget_chunks_long_prompts_and_samples_only_at_the_end():
    scheduler = make_scheduler(max_num_batched_tokens=16)
    long = make_seq(40)
    scheduler.add(long)
    outs = [run_step(scheduler) for _ in range(4)]
    assert [chunks(o) for o in outs] == [
        [(long.seq_id, 0, 16)],
        [(long.seq_id, 16, 16)],
        [(long.seq_id, 32, 8)],
        [(long.seq_id, 40, 1)],
    ]
    assert [o.scheduled[0].is_sampling for o in outs] == [False, False, True, True]
    assert long.output_ids == [7, 7]


def test_budget_is_shared_between_decodes_and_a_prompt_chunk():
    scheduler = make_scheduler(max_num_batched_tokens=10)
    a, b = make_seq(4), make_seq(20)
    scheduler.add(a)
    run_step(scheduler)
    scheduler.add(b)
    assert chunks(run_step(scheduler)) == [(a.seq_id, 4, 1), (b.seq_id, 0, 9)]


def test_without_chunked_prefill_a_long_prompt_waits_for_a_full_budget():
    scheduler = make_scheduler(max_num_batched_tokens=10, enable_chunked_prefill=False)
    a, b = make_seq(4), make_seq(10)
    scheduler.add(a)
    scheduler.add(b)
    assert chunks(run_step(scheduler)) == [(a.seq_id, 0, 4)]  # b does not fit beside a
    scheduler.finish(a, "stop")
    assert chunks(run_step(scheduler)) == [(b.seq_id, 0, 10)]


def test_fcfs_a_blocked_head_is_not_overtaken():
    scheduler = make_scheduler(num_blocks=4, block_size=4)
    first, big, small = make_seq(8), make_seq(12), make_seq(2)
    for seq in (first, big, small):
        scheduler.add(seq)
    assert chunks(run_step(scheduler)) == [(first.seq_id, 0, 8)]  # big needs 3 of 2 free blocks
    assert list(scheduler.waiting) == [big, small]


def test_full_cache_preempts_the_latest_arrival_which_resumes_first_by_recompute():
    scheduler = make_scheduler(num_blocks=4, block_size=4)
    old, new = make_seq(8), make_seq(8)
    scheduler.add(old)
    scheduler.add(new)
    run_step(scheduler)  # 2 blocks each; both have 9 tokens now (one sampled)
    out = run_step(scheduler)  # old needs a third block: new is preempted
    assert out.preempted == [new] and chunks(out) == [(old.seq_id, 8, 1)]
    assert new.status is SequenceStatus.WAITING and new.block_ids == []
    assert new.num_computed_tokens == 0 and new.token_ids == [*range(8), 7]
    assert scheduler.waiting[0] is new
    scheduler.finish(old, "stop")
    resumed = run_step(scheduler)  # recompute: prompt and the sampled token, then sample
    assert chunks(resumed) == [(new.seq_id, 0, 9)] and resumed.scheduled[0].is_sampling
    assert new.output_ids == [7, 7] and new.num_preemptions == 1


def test_the_latest_arrival_preempts_itself_rather_than_an_earlier_one():
    scheduler = make_scheduler(num_blocks=2, block_size=4)
    a, b = make_seq(3), make_seq(4)
    scheduler.add(a)
    scheduler.add(b)
    run_step(scheduler)
    out = run_step(scheduler)  # a still fits its block; b needs a second one and yields
    assert out.preempted == [b] and chunks(out) == [(a.seq_id, 3, 1)]
    assert scheduler.running == [a] and scheduler.waiting[0] is b


def test_block_manager_accounting():
    blocks = BlockManager(num_blocks=5, block_size=4)
    seq = make_seq(1)
    assert blocks.blocks_needed(seq, 9) == 3
    blocks.allocate(seq, 9)
    assert len(seq.block_ids) == 3 and blocks.num_free_blocks == 2
    assert blocks.blocks_needed(seq, 12) == 0 and not blocks.can_allocate(seq, 21)
    assert blocks.usage == 3 / 5
    blocks.free(seq)
    assert blocks.num_free_blocks == 5 and seq.block_ids == []
