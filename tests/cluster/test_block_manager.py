"""Block manager and scheduler with prefix caching, without a model: hash chain, reference
counts, LRU eviction, the last-token cap, and where admission starts."""

from __future__ import annotations

import itertools
from collections import Counter

from moe_serve.cluster.block_manager import ROOT_HASH, BlockManager, hash_block
from moe_serve.cluster.scheduler import Scheduler, SchedulerConfig
from moe_serve.cluster.sequence import Sequence
from tests.cluster.test_scheduler import chunks, make_scheduler, make_seq, run_step

_ids = itertools.count(10_000)


def seq_of(token_ids: list[int], can_hit_cache: bool = True) -> Sequence:
    return Sequence(next(_ids), list(token_ids), len(token_ids), 100, can_hit_cache=can_hit_cache)


def compute(blocks: BlockManager, seq: Sequence, num_tokens: int | None = None) -> Sequence:
    """Admit `seq` as the scheduler would (cached prefix first), compute up to `num_tokens`."""
    num_tokens = seq.num_tokens if num_tokens is None else num_tokens
    if not seq.block_ids:
        cached_ids = blocks.lookup(seq)
        blocks.allocate(seq, num_tokens, cached_ids)
        seq.num_computed_tokens = len(cached_ids) * blocks.block_size
    blocks.allocate(seq, num_tokens)
    seq.num_computed_tokens = num_tokens
    blocks.register(seq)
    return seq


def assert_accounting(blocks: BlockManager, live: list[Sequence]) -> None:
    """Every block is held (with the right count), free and empty, or free and cached."""
    refs = Counter(b for seq in live for b in seq.block_ids)
    assert blocks.ref_counts == [refs[b] for b in range(blocks.num_blocks)]
    empty, evictable = set(blocks.empty_block_ids), set(blocks.evictable_block_ids)
    held = set(refs)
    assert len(empty) + len(evictable) + len(held) == blocks.num_blocks
    assert empty | evictable | held == set(range(blocks.num_blocks))
    assert len(blocks.empty_block_ids) == len(empty)  # no block listed twice
    registered = {b for b, h in enumerate(blocks.block_hashes) if h is not None}
    assert evictable <= registered and not empty & registered
    assert {b: blocks.block_hashes[b] for b in blocks.cached_block_ids.values()} == {
        b: h for h, b in blocks.cached_block_ids.items()
    }
    assert len(blocks.cached_block_ids) == len(registered)


def test_block_hashes_chain_every_block_before():
    blocks = BlockManager(num_blocks=16, block_size=4)
    a = compute(blocks, seq_of(list(range(12))))
    h0 = hash_block(ROOT_HASH, [0, 1, 2, 3])
    h1 = hash_block(h0, [4, 5, 6, 7])
    assert a.block_hashes == [h0, h1, hash_block(h1, [8, 9, 10, 11])]
    assert hash_block(ROOT_HASH, [4, 5, 6, 7]) != h1  # same tokens, other prefix
    # same first and third block as `a`, another second block: only the first is a hit
    b = seq_of([0, 1, 2, 3, 99, 5, 6, 7, 8, 9, 10, 11, 12])
    assert blocks.lookup(b) == a.block_ids[:1]
    assert_accounting(blocks, [a])


def test_a_hit_leaves_at_least_the_last_token_to_compute():
    blocks = BlockManager(num_blocks=16, block_size=4)
    a = compute(blocks, seq_of(list(range(12))))
    assert blocks.lookup(seq_of(list(range(12)))) == a.block_ids[:2]  # whole prompt cached
    assert blocks.lookup(seq_of(list(range(13)))) == a.block_ids
    assert blocks.lookup(seq_of(list(range(9)))) == a.block_ids[:2]
    assert blocks.lookup(seq_of(list(range(8)))) == a.block_ids[:1]
    assert blocks.lookup(seq_of([0])) == []


def test_blocks_are_registered_only_once_computed():
    blocks = BlockManager(num_blocks=16, block_size=4)
    a = seq_of(list(range(12)))
    blocks.allocate(a, 12)  # scheduled, not computed
    blocks.register(a)
    probe = seq_of(list(range(13)))
    assert blocks.lookup(probe) == []
    compute(blocks, a, 6)
    assert blocks.lookup(probe) == a.block_ids[:1]
    compute(blocks, a, 12)
    assert blocks.lookup(probe) == a.block_ids


def test_shared_blocks_are_reference_counted():
    blocks = BlockManager(num_blocks=16, block_size=4)
    a = compute(blocks, seq_of(list(range(12))))
    b = compute(blocks, seq_of([*range(10), 50, 51, 52]))
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2:] != a.block_ids[2:]
    assert [blocks.ref_counts[i] for i in a.block_ids] == [2, 2, 1]
    assert blocks.num_free_blocks == 16 - 3 - 2
    assert_accounting(blocks, [a, b])
    shared = a.block_ids[:2]
    blocks.free(a)
    assert [blocks.ref_counts[i] for i in shared] == [1, 1]
    assert blocks.num_free_blocks == 16 - 4
    assert_accounting(blocks, [b])
    blocks.free(b)
    assert blocks.num_free_blocks == 16 and not any(blocks.ref_counts)
    assert len(blocks.evictable_block_ids) == 3 + 1  # a's three, b's third (13 tokens: 3 full)
    assert_accounting(blocks, [])


def test_eviction_takes_empty_blocks_first_then_the_least_recently_freed():
    blocks = BlockManager(num_blocks=6, block_size=2)
    a = compute(blocks, seq_of([1, 2, 3, 4]))
    b = compute(blocks, seq_of([5, 6, 7, 8]))
    a_ids, b_ids = a.block_ids, b.block_ids
    blocks.free(a)
    blocks.free(b)  # LRU: a's tail, a's head, b's tail, b's head
    assert list(blocks.evictable_block_ids) == [*a_ids[::-1], *b_ids[::-1]]
    c = compute(blocks, seq_of([9, 10, 11, 12]))  # the two never-registered blocks
    assert blocks.num_evictions == 0 and len(blocks.lookup(seq_of([1, 2, 3, 4, 0]))) == 2
    d = compute(blocks, seq_of([13, 14]))
    assert d.block_ids == a_ids[1:] and blocks.num_evictions == 1
    assert blocks.lookup(seq_of([1, 2, 3, 4, 0])) == a_ids[:1]  # head outlived the tail
    e = compute(blocks, seq_of([1, 2, 0]))  # a hit takes a's head, the oldest, off the list
    assert e.block_ids == [a_ids[0], b_ids[1]] and blocks.ref_counts[a_ids[0]] == 1
    assert list(blocks.evictable_block_ids) == [b_ids[0]]
    blocks.free(e)  # e's tail (never registered) is empty; a's head the most recently freed
    assert list(blocks.empty_block_ids) == [b_ids[1]]
    assert list(blocks.evictable_block_ids) == [b_ids[0], a_ids[0]]
    f = compute(blocks, seq_of([20, 21, 22, 23]))
    assert f.block_ids == [b_ids[1], b_ids[0]]
    assert list(blocks.evictable_block_ids) == [a_ids[0]]
    assert_accounting(blocks, [c, d, f])


def test_no_hits_when_disabled_or_when_the_prompt_must_be_computed():
    off = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    compute(off, seq_of(list(range(12))))
    assert off.lookup(seq_of(list(range(12)))) == [] and not off.cached_block_ids
    on = BlockManager(num_blocks=8, block_size=4)
    a = compute(on, seq_of(list(range(12)), can_hit_cache=False))  # still fills the cache
    assert on.lookup(seq_of(list(range(12)), can_hit_cache=False)) == []
    assert on.lookup(seq_of(list(range(12)))) == a.block_ids[:2]


def test_dynamic_rope_limit_caches_only_blocks_computed_within_it():
    blocks = BlockManager(num_blocks=16, block_size=4, max_cacheable_len=8)
    compute(blocks, seq_of(list(range(12))))  # one chunk of 12 > 8: rotated for 12
    assert not blocks.cached_block_ids
    a = seq_of([*range(12), 50])
    compute(blocks, a, 8)
    compute(blocks, a, 12)
    assert blocks.lookup(seq_of(list(range(8)))) == a.block_ids[:1]
    assert blocks.lookup(seq_of(list(range(9)))) == []  # it would compute past the limit


def test_admission_starts_after_the_cached_prefix_and_counts_hits():
    scheduler = make_scheduler(prefix_caching=True)
    first, second = make_seq(10), make_seq(14)  # both start 0, 1, ..., 9
    scheduler.add(first)
    run_step(scheduler)
    scheduler.add(second)
    assert chunks(run_step(scheduler)) == [(first.seq_id, 10, 1), (second.seq_id, 8, 6)]
    assert (first.num_cached_tokens, second.num_cached_tokens) == (0, 8)
    assert second.block_ids[:2] == first.block_ids[:2]
    assert (scheduler.num_queried_tokens, scheduler.num_hit_tokens) == (24, 8)


def test_a_preempted_sequence_resumes_from_its_own_cached_blocks():
    scheduler = make_scheduler(num_blocks=4, block_size=4, prefix_caching=True)
    old, new = make_seq(8), Sequence(next(_ids), [50 + t for t in range(8)], 8, 100)
    scheduler.add(old)
    scheduler.add(new)
    run_step(scheduler)
    assert run_step(scheduler).preempted == [new]
    scheduler.finish(old, "stop")
    # old's third block evicted new's tail (freed first); its head is still cached
    resumed = run_step(scheduler)
    assert chunks(resumed) == [(new.seq_id, 4, 5)] and resumed.scheduled[0].is_sampling
    assert new.num_cached_tokens == 0  # the first admission's figure
    assert scheduler.num_hit_tokens == 0
    scheduler.finish(new, "stop")
    assert_accounting(scheduler.blocks, [])


def test_a_hit_on_blocks_in_use_needs_only_the_new_blocks():
    blocks = BlockManager(num_blocks=4, block_size=4)
    scheduler = Scheduler(SchedulerConfig(), blocks)
    a = compute(blocks, seq_of(list(range(12))))  # running: 3 blocks held, 1 free
    b = seq_of([*range(12), 80, 81, 82])  # 4 blocks, 3 of them a's
    scheduler.add(b)
    assert chunks(scheduler.schedule()) == [(b.seq_id, 12, 3)]
    assert b.block_ids[:3] == a.block_ids and blocks.num_free_blocks == 0
    assert_accounting(blocks, [a, b])


def test_free_cached_blocks_a_hit_takes_count_against_the_free_ones():
    blocks = BlockManager(num_blocks=4, block_size=4)
    scheduler = Scheduler(SchedulerConfig(), blocks)
    a_ids = compute(blocks, seq_of(list(range(12)))).block_ids
    blocks.free(Sequence(-1, [], 0, 0, block_ids=list(a_ids)))
    holder = compute(blocks, seq_of([70]))  # the empty block: 3 free, all a's
    b = seq_of([*range(12), 80, 81, 82])  # 3 cached + 1 new: one short
    scheduler.add(b)
    assert scheduler.schedule().is_empty and list(scheduler.waiting) == [b]
    blocks.free(holder)
    assert chunks(scheduler.schedule()) == [(b.seq_id, 12, 3)]
    assert b.block_ids[:3] == a_ids and blocks.num_evictions == 0
    assert_accounting(blocks, [b])
