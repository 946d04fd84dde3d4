"""Logits of each architecture against transformers on random checkpoints (float32, 1e-4)."""

from __future__ import annotations

import pytest
import torch

from moe_serve.models.paged_flex import MIN_CUDA_TILE
from moe_serve.models.registry import load_model
from tests.helpers import PagedRunner, hf_logits, write_hf_checkpoint

TOL = 1e-4
# NOTE: head dims of 16 and more: what flex attention compiles to on CUDA (`--device cuda`;
# `models/paged_flex.check_supported`), as the published checkpoints' 64 and 128 do
SIZES = dict(hidden_size=64)
VARIANTS = {
    "olmoe-gqa-clip-norm": (
        "olmoe",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=8,
            num_experts_per_tok=2,
            clip_qkv=0.4,
            norm_topk_prob=True,
        ),
    ),
    "olmoe-mha-tied-linear-rope": (
        "olmoe",
        dict(
            num_attention_heads=4,
            num_experts=6,
            num_experts_per_tok=3,
            tie_word_embeddings=True,
            attention_bias=True,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
        ),
    ),
    "olmoe-dynamic-rope": (
        "olmoe",
        dict(
            num_attention_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=8,
            rope_parameters={"rope_type": "dynamic", "factor": 3.0, "rope_theta": 10000.0},
        ),
    ),
    "jetmoe-tied": (
        "jetmoe",
        dict(num_local_experts=6, num_experts_per_tok=2, kv_channels=16, num_key_value_heads=2),
    ),
    "jetmoe-untied-top3-dynamic": (
        "jetmoe",
        dict(
            num_local_experts=5,
            num_experts_per_tok=3,
            kv_channels=16,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            max_position_embeddings=8,
            rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000.0},
        ),
    ),
    "granitemoe-gqa-multipliers": (
        "granitemoe",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=8,
            num_experts_per_tok=2,
            embedding_multiplier=3.0,
            attention_multiplier=0.2,
            residual_multiplier=0.4,
            logits_scaling=2.5,
        ),
    ),
    "granitemoe-tied-linear-bias": (
        "granitemoe",
        dict(
            num_attention_heads=2,
            num_local_experts=4,
            num_experts_per_tok=1,
            tie_word_embeddings=True,
            attention_bias=True,
            rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
        ),
    ),
}
PROMPT = [5, 17, 33, 2, 90, 41, 8, 8, 63, 12, 77, 3, 50]


def paged(model, block_size: int = 4) -> PagedRunner:
    """Small cache blocks (a prompt spans several) where the kernel allows them: on CUDA, the
    smallest block flex compiles for (`MIN_CUDA_TILE`)."""
    if model.materialised.device.type == "cuda":
        block_size = MIN_CUDA_TILE
    return PagedRunner(model, block_size=block_size)


STATIC_ROPE = sorted(name for name in VARIANTS if "dynamic" not in name)
_PAIRS: dict[str, tuple] = {}


def _pair(name: str, tmp_path_factory, device: torch.device):
    """(name, transformers' model, ours), both on `device` (`--device`)."""
    if name not in _PAIRS:
        arch, overrides = VARIANTS[name]
        path = tmp_path_factory.mktemp(name)
        reference = write_hf_checkpoint(arch, path, **(SIZES | overrides)).to(device)
        _PAIRS[name] = (name, reference, load_model(path, device=device))
    return _PAIRS[name]


@pytest.fixture(params=sorted(VARIANTS))
def pair(request, tmp_path_factory, device):
    return _pair(request.param, tmp_path_factory, device)


@pytest.fixture(params=STATIC_ROPE)
def static_pair(request, tmp_path_factory, device):
    """Variants whose rotary tables do not depend on the sequence length."""
    return _pair(request.param, tmp_path_factory, device)


def test_full_sequence_logits_match_transformers(pair):
    _, reference, model = pair
    expected = hf_logits(reference, PROMPT)
    actual = paged(model).step({"a": PROMPT})["a"]
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=TOL, rtol=0)


def test_incremental_decoding_matches_transformers_cache(pair):
    _, reference, model = pair
    split = 5
    runner = paged(model, block_size=2)
    actual = [runner.step({"a": PROMPT[:split]})["a"][-1]]
    actual += [runner.step({"a": [t]})["a"][-1] for t in PROMPT[split:]]
    with torch.no_grad():
        ids = lambda rows: torch.tensor(rows, device=reference.device)  # noqa: E731
        out = reference(ids([PROMPT[:split]]), use_cache=True)
        expected, cache = [out.logits[0, -1]], out.past_key_values
        for token in PROMPT[split:]:
            out = reference(ids([[token]]), past_key_values=cache, use_cache=True)
            expected.append(out.logits[0, -1])
            cache = out.past_key_values
    torch.testing.assert_close(torch.stack(actual), torch.stack(expected), atol=TOL, rtol=0)


def test_incremental_decoding_equals_full_forward(static_pair):
    # NOTE: dynamic NTK re-bases by length, so there only the comparison with HF's cache holds.
    _, _, model = static_pair
    full = paged(model).step({"a": PROMPT})["a"]
    runner = paged(model, block_size=3)
    rows = [runner.step({"a": PROMPT[:4]})["a"]]
    rows += [runner.step({"a": PROMPT[i : i + 1]})["a"] for i in range(4, 9)]
    rows.append(runner.step({"a": PROMPT[9:]})["a"])  # a chunk on top of cached context
    torch.testing.assert_close(torch.cat(rows), full, atol=TOL, rtol=0)


def test_mixed_batch_equals_each_sequence_alone(pair):
    _, _, model = pair
    alone: dict[str, torch.Tensor] = {}
    for seq, (first, second) in _SCHEDULE.items():
        runner = paged(model)
        runner.step({seq: first})
        alone[seq] = runner.step({seq: second})[seq]
    batched = paged(model)
    batched.step({seq: first for seq, (first, _) in _SCHEDULE.items()})
    together = batched.step({seq: second for seq, (_, second) in _SCHEDULE.items()})
    for seq in _SCHEDULE:
        torch.testing.assert_close(together[seq], alone[seq], atol=TOL, rtol=0)


# Two steps per sequence: decodes (one new token) and chunks (several) after cached context.
_SCHEDULE = {
    "decode-long": (PROMPT[:11], [7]),
    "decode-short": ([4, 9], [21]),
    "chunk": (PROMPT[:3], [11, 12, 13, 14, 15, 16]),
    "fresh-after-one": ([44], [45, 46, 47]),
}
