"""The engine on tiny checkpoints: greedy parity with transformers, sampling, limits, leaks."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import torch

from moe_serve.cluster.engine_core import EngineConfig, EngineCore
from moe_serve.cluster.params import RequestError, SamplingParams
from moe_serve.models.registry import load_model
from moe_serve.models.tiny import ARCHS
from moe_serve.models.tokenizer import TextTokenizer

MAX_TOKENS = 32


@dataclass
class Result:
    token_ids: dict[int, list[int]] = field(default_factory=dict)
    text: dict[int, str] = field(default_factory=dict)
    finish: dict[int, str | None] = field(default_factory=dict)
    logprobs: dict[int, list] = field(default_factory=dict)
    prompt_logprobs: tuple | None = None
    usage: tuple[int, int] = (0, 0)


def collect(outputs, results: dict[str, Result]) -> None:
    for out in outputs:
        result = results.setdefault(out.request_id, Result())
        for d in out.deltas:
            result.token_ids.setdefault(d.index, []).extend(d.token_ids)
            result.text[d.index] = result.text.get(d.index, "") + d.text
            result.logprobs.setdefault(d.index, []).extend(d.logprobs)
            result.finish[d.index] = d.finish_reason
        if out.prompt_logprobs is not None:
            result.prompt_logprobs = out.prompt_logprobs
        result.usage = (out.num_prompt_tokens, out.num_output_tokens)


def run(engine: EngineCore, requests: dict[str, tuple[list[int], SamplingParams]]):
    results: dict[str, Result] = {}
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    while engine.has_unfinished:
        collect(engine.step(), results)
    return results


def greedy(max_tokens=MAX_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def make_engine(path, **config) -> EngineCore:
    defaults = dict(max_model_len=256, block_size=4, max_num_seqs=16)
    return EngineCore(
        load_model(path), TextTokenizer.from_dir(path), EngineConfig(**defaults | config)
    )


def mixed_prompts(vocab: int, num: int = 16, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, 40))] for _ in range(num)]


@pytest.fixture(scope="module", params=ARCHS)
def arch_setup(request, tiny_dirs):
    from transformers import AutoModelForCausalLM

    path = tiny_dirs[request.param]
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    prompts = mixed_prompts(reference.config.vocab_size)
    expected = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        # NOTE: an explicit mask: inferred from pad ids it would hide prompt tokens equal to pad
        out = reference.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=MAX_TOKENS,
            eos_token_id=None,
            pad_token_id=0,
        )
        expected.append(out[0, len(prompt) :].tolist())
        assert len(expected[-1]) == MAX_TOKENS
    return path, prompts, expected


def test_greedy_matches_transformers_alone_and_in_a_batch_of_16(arch_setup):
    path, prompts, expected = arch_setup
    engine = make_engine(path)
    for i, prompt in enumerate(prompts):
        alone = run(engine, {"alone": (prompt, greedy())})["alone"]
        assert alone.token_ids[0] == expected[i], f"prompt {i} alone"
    batch = run(engine, {str(i): (p, greedy()) for i, p in enumerate(prompts)})
    for i in range(len(prompts)):
        assert batch[str(i)].token_ids[0] == expected[i], f"prompt {i} in the batch"
        assert batch[str(i)].finish[0] == "length"
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_preemption_and_chunked_prefill_keep_greedy_outputs(arch_setup):
    path, prompts, expected = arch_setup
    engine = make_engine(path, num_kv_blocks=64, max_num_batched_tokens=16)
    batch = run(engine, {str(i): (p, greedy()) for i, p in enumerate(prompts)})
    assert engine.scheduler.num_preemptions > 0
    for i in range(len(prompts)):
        assert batch[str(i)].token_ids[0] == expected[i], f"prompt {i}"
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.fixture(scope="module")
def olmoe(tiny_dirs):
    return make_engine(tiny_dirs["olmoe"])


def test_seeded_sampling_is_the_same_alone_and_batched(olmoe):
    prompts = mixed_prompts(olmoe.model.config.vocab_size, num=8, seed=1)
    params = [
        SamplingParams(
            max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=100 + i, ignore_eos=True
        )
        for i in range(8)
    ]
    alone = [
        run(olmoe, {"a": (p, q)})["a"].token_ids[0] for p, q in zip(prompts, params, strict=True)
    ]
    batch = run(
        olmoe, {str(i): (p, q) for i, (p, q) in enumerate(zip(prompts, params, strict=True))}
    )
    assert [batch[str(i)].token_ids[0] for i in range(8)] == alone
    assert len({tuple(a) for a in alone}) > 1


def test_n_completions_use_consecutive_seeds(olmoe):
    prompt = [5, 6, 7, 8]
    base = dict(max_tokens=12, temperature=1.0, ignore_eos=True)
    together = run(olmoe, {"n": (prompt, SamplingParams(n=3, seed=7, **base))})["n"]
    singles = [
        run(olmoe, {"s": (prompt, SamplingParams(seed=7 + i, **base))})["s"] for i in range(3)
    ]
    assert [together.token_ids[i] for i in range(3)] == [s.token_ids[0] for s in singles]
    assert together.usage == (4, 36)


def churn(engine: EngineCore, num_requests: int, max_live: int, abort_rate: float, new, check):
    """Random traffic until done: up to `max_live` requests in flight, `new()` -> (prompt,
    params) for each new one, a step, then each live request aborted with `abort_rate`;
    `check()` after every step."""
    rng = random.Random(num_requests)
    pending, live = [f"r{i}" for i in range(num_requests)], set()
    while pending or engine.has_unfinished:
        while pending and len(live) < max_live:
            request_id = pending.pop()
            engine.add_request(request_id, *new())
            live.add(request_id)
        live -= {out.request_id for out in engine.step() if out.finished}
        for request_id in [r for r in sorted(live) if rng.random() < abort_rate]:
            assert engine.abort(request_id).finished
            live.discard(request_id)
        check()


def test_no_block_leaks_after_200_requests_with_random_aborts(olmoe):
    rng = random.Random(3)
    vocab = olmoe.model.config.vocab_size

    def new():
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
        n = rng.choice([1, 1, 2])
        return prompt, SamplingParams(rng.randint(1, 20), rng.choice([0.0, 1.0]), n=n)

    churn(olmoe, 200, 24, 0.05, new, lambda: None)
    assert olmoe.blocks.num_free_blocks == olmoe.blocks.num_blocks
    assert not olmoe.requests and not olmoe.owner and not olmoe.scheduler.has_unfinished


def test_stop_token_and_stop_string_finish_with_stop(olmoe):
    prompt = [11, 12, 13]
    free = run(olmoe, {"f": (prompt, greedy(max_tokens=20))})["f"]
    tokens, text = free.token_ids[0], free.text[0]
    cut = tokens[5]
    stopped = run(olmoe, {"t": (prompt, greedy(max_tokens=20, stop_token_ids=(cut,)))})["t"]
    assert stopped.token_ids[0] == tokens[: tokens.index(cut) + 1]
    assert stopped.finish[0] == "stop"
    needle = text[len(text) // 2 : len(text) // 2 + 3]
    by_string = run(olmoe, {"s": (prompt, greedy(max_tokens=20, stop=(needle,)))})["s"]
    assert by_string.text[0] == text[: text.index(needle)] and by_string.finish[0] == "stop"


def test_requests_over_the_limits_are_rejected_before_any_work(olmoe):
    vocab = olmoe.model.config.vocab_size
    cases = [
        ([1] * 256, SamplingParams(), "max_model_len is 256"),
        ([1] * 250, SamplingParams(max_tokens=10), "exceeds max_model_len"),
        ([vocab], SamplingParams(), "outside the vocabulary"),
        ([], SamplingParams(), "empty"),
        ([1], SamplingParams(stop_token_ids=(vocab + 5,)), "outside the vocabulary"),
    ]
    for prompt, params, message in cases:
        with pytest.raises(RequestError, match=message):
            olmoe.add_request("bad", prompt, params)
    assert not olmoe.has_unfinished
    olmoe.add_request("dup", [1], greedy(max_tokens=1))
    with pytest.raises(RequestError, match="already in use"):
        olmoe.add_request("dup", [1], greedy(max_tokens=1))
    olmoe.abort("dup")


def test_logprobs_and_prompt_logprobs_match_the_model(olmoe):
    prompt = [21, 22, 23, 24, 25]
    params = greedy(max_tokens=3, logprobs=4, prompt_logprobs=2)
    result = run(olmoe, {"lp": (prompt, params)})["lp"]
    full = prompt + result.token_ids[0]
    from tests.helpers import PagedRunner

    reference = torch.log_softmax(PagedRunner(olmoe.model).step({"x": full})["x"], -1)
    assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == len(prompt)
    for position in range(1, len(prompt)):
        entry = result.prompt_logprobs[position]
        assert entry.token_id == prompt[position] and len(entry.top) == 2
        assert entry.logprob == pytest.approx(
            float(reference[position - 1, prompt[position]]), abs=1e-4
        )
    for k, entry in enumerate(result.logprobs[0]):
        position = len(prompt) + k
        assert entry.token_id == full[position] and entry.rank == 1 and len(entry.top) == 4
        assert entry.logprob == pytest.approx(
            float(reference[position - 1, full[position]]), abs=1e-4
        )


def test_without_chunked_prefill_the_token_budget_must_hold_a_whole_prompt(tiny_dirs):
    with pytest.raises(ValueError, match="could never be scheduled"):
        make_engine(tiny_dirs["olmoe"], enable_chunked_prefill=False, max_num_batched_tokens=64)
    engine = make_engine(
        tiny_dirs["olmoe"], enable_chunked_prefill=False, max_num_batched_tokens=256
    )
    assert not engine.scheduler.config.enable_chunked_prefill
