"""Micro-batch overlap: the policy that chooses which steps split (with times written here),
the cut, and the two-micro-batch forward against the one-batch one in process (the shards'
side, at EP 2 and 3, is in test_ray_replica.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from moe_serve.cluster.overlap import OverlapConfig, OverlapPolicy
from moe_serve.cluster.runner import split_batch
from moe_serve.models.tiny import ARCHS
from tests.cluster.test_engine_core import greedy, make_engine, mixed_prompts, run


def items(*num_tokens):
    return [SimpleNamespace(num_tokens=n) for n in num_tokens]


def test_the_cut_halves_the_tokens_with_whole_sequences():
    batch = items(5, 1, 1, 1)
    assert [len(part) for part in split_batch(batch)] == [1, 3]  # 5 | 3 beats 6 | 2
    assert [len(part) for part in split_batch(items(*[1] * 16))] == [8, 8]
    assert [len(part) for part in split_batch(items(40, 3))] == [1, 1]  # never an empty one


def test_off_on_and_the_smallest_step():
    assert not OverlapPolicy(OverlapConfig("off")).choose(4096)
    on = OverlapPolicy(OverlapConfig("on", min_tokens=16))
    assert on.choose(16) and not on.choose(15)
    assert not on.is_probing(64)  # "on" measures nothing


def probe(policy: OverlapPolicy, num_tokens: int, seconds: dict[bool, float]) -> list[bool]:
    """Steps of `num_tokens` until the policy has chosen; each takes `seconds[split]`."""
    choices = []
    while policy.is_probing(num_tokens):
        split = policy.choose(num_tokens)
        choices.append(split)
        policy.record(num_tokens, split, seconds[split])
    return choices


def test_auto_times_both_ways_per_bucket_and_keeps_the_faster():
    policy = OverlapPolicy(OverlapConfig("auto", min_tokens=8, probe_steps=3, reprobe_steps=5))
    assert probe(policy, 16, {False: 1.0, True: 1.5}) == [False, True] * 3  # alternating
    assert not policy.choose(16) and not policy.choose(31)  # the same bucket: 16-31 tokens
    assert probe(policy, 64, {False: 2.0, True: 1.5})  # another bucket, another answer
    assert policy.choose(64)
    assert policy.summary() == {5: False, 7: True}
    for _ in range(3):  # the 5th chosen step of a bucket measures it again
        policy.choose(16)
    assert policy.is_probing(16)
    assert probe(policy, 16, {False: 1.0, True: 0.5}) and policy.choose(16)


def test_bad_overlap_settings_are_refused():
    with pytest.raises(ValueError, match="auto, on or off"):
        OverlapConfig("sometimes")
    with pytest.raises(ValueError, match="min_tokens"):
        OverlapConfig("on", min_tokens=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_two_micro_batches_give_the_one_batch_outputs(tiny_dirs, arch):
    path = str(tiny_dirs[arch])
    requests = {
        str(i): (prompt, greedy(logprobs=0))
        for i, prompt in enumerate(mixed_prompts(500, num=8, seed=3))
    }
    whole = run(make_engine(path), requests)
    engine = make_engine(path)
    engine.runner.overlap = OverlapPolicy(OverlapConfig("on", min_tokens=1))
    split = run(engine, requests)
    for request_id, expected in whole.items():
        assert split[request_id].token_ids == expected.token_ids
        got = [lp.logprob for lp in split[request_id].logprobs[0]]
        assert got == pytest.approx([lp.logprob for lp in expected.logprobs[0]], abs=1e-5)
