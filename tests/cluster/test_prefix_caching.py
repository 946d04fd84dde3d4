"""Prefix caching in the engine on tiny checkpoints: outputs identical with it on and off
(after hits, eviction and preemption; EP 1 and 2), hits counted exactly, no block leaks."""

from __future__ import annotations

import random

import pytest

from moe_serve.cluster.engine_core import EngineConfig, EngineCore
from moe_serve.cluster.local_replica import ThreadShardLauncher
from moe_serve.cluster.params import SamplingParams
from moe_serve.cluster.replica_engine import ReplicaConfig, ReplicaEngine
from moe_serve.models.tiny import ARCHS
from tests.cluster.test_block_manager import assert_accounting
from tests.cluster.test_engine_core import churn, greedy, make_engine, run


def family_prompts(vocab: int, seed: int, num_families: int = 4, per_family: int = 4):
    """Prompts in families sharing a prefix (lengths off block boundaries), one repeated whole,
    one a prefix of another."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(num_families):
        prefix = [rng.randrange(vocab) for _ in range(rng.randint(6, 23))]
        for _ in range(per_family):
            prompts.append(prefix + [rng.randrange(vocab) for _ in range(rng.randint(1, 9))])
    return [*prompts, prompts[0], prompts[1][: len(prompts[1]) - 1]]


def run_waves(engine: EngineCore, waves: list[list[list[int]]], max_tokens: int = 12):
    """Each wave's prompts together, waves one after another -> every request's tokens."""
    tokens = {}
    for w, wave in enumerate(waves):
        results = run(engine, {f"{w}.{i}": (p, greedy(max_tokens)) for i, p in enumerate(wave)})
        tokens |= {rid: r.token_ids[0] for rid, r in results.items()}
    return tokens


def on_and_off(path, waves, **config):
    engines = [make_engine(path, enable_prefix_caching=on, **config) for on in (True, False)]
    on, off = (run_waves(engine, waves) for engine in engines)
    assert on == off
    for engine in engines:
        assert_accounting(engine.blocks, [])
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert engines[1].stats().prefix_cache_hits == 0
    return engines[0]


@pytest.fixture(params=ARCHS)
def arch_path(request, tiny_dirs):
    return tiny_dirs[request.param]


def test_greedy_outputs_are_the_same_with_prefix_caching_on_and_off(arch_path):
    vocab = 96
    prompts = family_prompts(vocab, seed=0)
    # first one per family alone, then the rest together: their prefixes are cached
    waves = [[p] for p in prompts[::4]] + [prompts]
    engine = on_and_off(arch_path, waves)
    stats = engine.stats()
    assert stats.prefix_cache_hits > stats.prefix_cache_queries // 3


def test_same_after_eviction_and_preemption(arch_path):
    prompts = family_prompts(96, seed=1, num_families=6)
    waves = [prompts[:12], prompts[12:], prompts[::3], prompts[::-1]]
    # 20 blocks of 4: families evict each other; 16-token steps preempt
    engine = on_and_off(
        arch_path, waves, num_kv_blocks=20, max_model_len=64, max_num_batched_tokens=16
    )
    assert engine.blocks.num_evictions > 0 and engine.scheduler.num_preemptions > 0
    assert engine.stats().prefix_cache_hits > 0


def test_prompt_logprobs_are_computed_not_cached(arch_path):
    prompt = family_prompts(96, seed=2)[0]
    params = greedy(max_tokens=4, prompt_logprobs=3, logprobs=2)
    results = []
    for on in (True, False):
        engine = make_engine(arch_path, enable_prefix_caching=on)
        run(engine, {"warm": (prompt, greedy(max_tokens=4))})
        results.append(run(engine, {"lp": (prompt, params)})["lp"])
    assert results[0].prompt_logprobs == results[1].prompt_logprobs
    assert results[0].logprobs == results[1].logprobs
    assert results[0].prompt_logprobs[1] is not None


def num_cached(engine: EngineCore, prompt: list[int], params: SamplingParams | None = None) -> int:
    engine.add_request("r", prompt, params or greedy(max_tokens=2))
    outputs = []
    while engine.has_unfinished:
        outputs.extend(engine.step())
    assert len({out.num_cached_tokens for out in outputs}) == 1
    return outputs[-1].num_cached_tokens


def test_cached_tokens_are_the_full_blocks_of_the_shared_prefix(tiny_dirs):
    engine = make_engine(tiny_dirs["olmoe"], block_size=4)
    prefix = list(range(30, 40))  # 10 tokens: 2 full blocks of 4
    assert num_cached(engine, [*prefix, 50, 51, 52]) == 0
    assert num_cached(engine, [*prefix, 60, 61]) == 8
    assert num_cached(engine, [*prefix, 50, 51, 52]) == 12  # all 13 but the last block
    assert num_cached(engine, list(range(30, 42))) == 8  # 12 tokens, 3 blocks cached: 2 used
    assert num_cached(engine, [*prefix, 50], greedy(max_tokens=2, prompt_logprobs=1)) == 0
    assert num_cached(engine, list(range(31, 45))) == 0  # shifted by one: another chain
    stats = engine.stats()
    assert stats.prefix_cache_queries == 13 + 12 + 13 + 12 + 11 + 14
    assert stats.prefix_cache_hits == 8 + 12 + 8
    off = make_engine(tiny_dirs["olmoe"], block_size=4, enable_prefix_caching=False)
    num_cached(off, [*prefix, 1])
    assert num_cached(off, [*prefix, 1]) == 0 and off.stats().prefix_cache_queries == 0


def test_n_samples_share_the_prompt_blocks(tiny_dirs):
    prompt = list(range(40, 53))  # 13 tokens: samples 1 and 2 find 12 cached
    params = SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=5, ignore_eos=True)
    results, stats = [], []
    for on in (True, False):
        engine = make_engine(tiny_dirs["granitemoe"], enable_prefix_caching=on)
        results.append(run(engine, {"n": (prompt, params)})["n"])
        stats.append(engine.stats())
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert results[0].token_ids == results[1].token_ids and len(results[0].token_ids) == 3
    assert (stats[0].prefix_cache_queries, stats[0].prefix_cache_hits) == (3 * 13, 2 * 12)
    assert (stats[1].prefix_cache_queries, stats[1].prefix_cache_hits) == (0, 0)


def test_no_block_leaks_with_hits_aborts_preemptions_and_evictions(tiny_dirs):
    engine = make_engine(
        tiny_dirs["olmoe"], num_kv_blocks=40, max_model_len=64, max_num_batched_tokens=24
    )
    rng = random.Random(4)
    prefixes = [[rng.randrange(96) for _ in range(rng.randint(3, 20))] for _ in range(5)]

    def new():
        prompt = rng.choice(prefixes) + [rng.randrange(96) for _ in range(rng.randint(1, 8))]
        params = SamplingParams(
            max_tokens=rng.randint(1, 16),
            temperature=rng.choice([0.0, 1.0]),
            n=rng.choice([1, 1, 2, 3]),
            prompt_logprobs=rng.choice([None, None, None, 1]),
        )
        return prompt, params

    def check():
        holders = [s for state in engine.requests.values() for s in state.seqs if s.block_ids]
        assert_accounting(engine.blocks, holders)

    churn(engine, 150, 12, 0.03, new, check)
    assert_accounting(engine.blocks, [])
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert not engine.requests and not engine.owner and not engine.held
    assert engine.scheduler.num_preemptions > 0 and engine.blocks.num_evictions > 0
    assert engine.stats().prefix_cache_hits > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_parallel_outputs_are_the_same_with_prefix_caching_on_and_off(tiny_dirs, arch):
    prompts = family_prompts(96, seed=3, num_families=2)
    waves = [prompts[:1], prompts[4:5], prompts]
    outputs, hits = [], []
    for on in (True, False):
        engine_config = EngineConfig(max_model_len=256, block_size=4, enable_prefix_caching=on)
        config = ReplicaConfig(str(tiny_dirs[arch]), expert_parallel_size=2, engine=engine_config)
        replica = ReplicaEngine(config, ThreadShardLauncher())
        try:
            outputs.append(run_waves(replica.core, waves))
            hits.append(replica.stats().core.prefix_cache_hits)
        finally:
            replica.shutdown()
    assert outputs[0] == outputs[1]
    assert hits[0] > 0 and hits[1] == 0
