"""Sampler: greedy, filters, seeded reproducibility whatever the batch, penalties, logprobs."""

from __future__ import annotations

import pytest
import torch

from moe_serve.cluster.params import RequestError, SamplingParams
from moe_serve.cluster.sampler import SamplingRow, TokenMask, sample

V = 50


def row(seed: int = 0, tokens=(1, 2, 3), num_prompt: int = 3, **params) -> SamplingRow:
    return SamplingRow(
        SamplingParams(**params), list(tokens), num_prompt, torch.Generator().manual_seed(seed)
    )


def logits_batch(num_rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_and_degenerate_filters_pick_the_argmax():
    logits = logits_batch(4)
    rows = [row(temperature=0.0), row(top_k=1), row(top_p=1e-6), row(min_p=1.0)]
    tokens, _ = sample(logits.clone(), rows)
    assert tokens == logits.argmax(-1).tolist()


def test_seeded_sampling_does_not_depend_on_the_batch():
    logits = logits_batch(6)
    alone = [
        sample(logits[i : i + 1].clone(), [row(seed=10 + i, top_p=0.9)])[0][0] for i in range(6)
    ]
    together, _ = sample(logits.clone(), [row(seed=10 + i, top_p=0.9) for i in range(6)])
    assert together == alone
    shuffled, _ = sample(logits.flip(0).clone(), [row(seed=15 - i, top_p=0.9) for i in range(6)])
    assert shuffled[::-1] == alone


def test_top_k_and_top_p_restrict_the_support():
    logits = logits_batch(1)
    order = logits[0].argsort(descending=True).tolist()
    seen_k = {sample(logits.clone(), [row(seed=s, top_k=3)])[0][0] for s in range(200)}
    assert seen_k <= set(order[:3]) and len(seen_k) > 1
    probs = torch.softmax(logits[0], -1)[order]
    nucleus = int((probs.cumsum(0) < 0.8).sum()) + 1
    seen_p = {sample(logits.clone(), [row(seed=s, top_p=0.8)])[0][0] for s in range(200)}
    assert seen_p <= set(order[:nucleus])


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1] + [1e-9] * (V - 3)]))
    counts = torch.zeros(V)
    for s in range(2000):
        counts[sample(logits.clone(), [row(seed=s)])[0][0]] += 1
    torch.testing.assert_close(counts[:3] / 2000, torch.tensor([0.7, 0.2, 0.1]), atol=0.04, rtol=0)


def test_penalties():
    logits = torch.zeros(1, V)
    logits[0, 5], logits[0, 6] = 2.0, 1.9
    # repetition (prompt + output): 5 was seen, so 6 wins
    assert sample(
        logits.clone(), [row(tokens=[5], num_prompt=1, temperature=0.0, repetition_penalty=1.5)]
    )[0] == [6]
    # presence/frequency count only generated tokens
    outputs = row(tokens=[9, 5, 5], num_prompt=1, temperature=0.0, frequency_penalty=0.1)
    assert sample(logits.clone(), [outputs])[0] == [6]
    prompt_only = row(tokens=[5, 5, 5], num_prompt=3, temperature=0.0, presence_penalty=2.0)
    assert sample(logits.clone(), [prompt_only])[0] == [5]


def test_logprobs_are_the_models_and_sorted():
    logits = logits_batch(2)
    tokens, logprobs = sample(logits.clone(), [row(logprobs=5), row(temperature=0.0)])
    expected = torch.log_softmax(logits[0], -1)
    first = logprobs[0]
    assert first.token_id == tokens[0] and logprobs[1] is None
    assert first.logprob == pytest.approx(float(expected[tokens[0]]), abs=1e-6)
    assert [t for t, _ in first.top] == expected.topk(5).indices.tolist()
    assert first.rank == int((expected > expected[tokens[0]]).sum()) + 1


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-0.1),
        dict(top_p=0.0),
        dict(top_k=-2),
        dict(min_p=1.5),
        dict(n=0),
        dict(max_tokens=0),
        dict(logprobs=21),
        dict(presence_penalty=3.0),
        dict(repetition_penalty=0.0),
        dict(stop=("",)),
        dict(seed=-1),
        dict(prompt_logprobs=-1),
    ],
)
def test_invalid_parameters_are_rejected(bad):
    with pytest.raises(RequestError):
        SamplingParams(**bad)


def mask_of(rows: list[int], allowed: list[set[int]]) -> TokenMask:
    bias = torch.full((len(rows), V + 7), float("-inf"))  # NOTE: wider than V, as llguidance's
    for r, tokens in enumerate(allowed):
        bias[r, sorted(tokens)] = 0.0
    return TokenMask(rows, bias)


def test_a_mask_restricts_only_its_rows_and_logprobs_stay_the_models():
    logits = logits_batch(4)
    best = logits.argmax(-1).tolist()
    allowed = [{3, 31, 40}, {best[3]}]
    rows = [row(temperature=0.0, logprobs=2) for _ in range(4)]
    tokens, logprobs = sample(logits.clone(), rows, mask_of([1, 3], allowed))
    assert tokens[0] == best[0] and tokens[2] == best[2] and tokens[3] == best[3]
    assert tokens[1] == max(allowed[0], key=lambda t: float(logits[1, t]))
    raw = torch.log_softmax(logits[1], -1)
    assert logprobs[1].logprob == pytest.approx(float(raw[tokens[1]]))
    assert logprobs[1].top[0][0] == best[1]
    seen = {
        sample(logits.clone(), [row(seed=s)], mask_of([0], allowed[:1]))[0][0] for s in range(100)
    }
    assert seen == allowed[0]
