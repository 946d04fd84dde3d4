"""The MoE interface: router rules and the grouped local experts executor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_serve.models.config import ModelConfig
from moe_serve.models.moe import LocalExperts, Router, uses_grouped_mm
from tests.host_syncs import HostSyncs

T, E, K, H, INTER = 11, 6, 2, 16, 16


def _config() -> ModelConfig:
    return ModelConfig(
        architecture="test",
        vocab_size=8,
        hidden_size=H,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=INTER,
        num_experts=E,
        num_experts_per_tok=K,
        max_position_embeddings=16,
    )


def _experts(expert_ids) -> LocalExperts:
    experts = LocalExperts(_config(), expert_ids)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        full_gate_up = torch.randn(E, 2 * INTER, H, generator=generator)
        full_down = torch.randn(E, H, INTER, generator=generator)
        experts.gate_up_proj.copy_(full_gate_up[list(expert_ids)])
        experts.down_proj.copy_(full_down[list(expert_ids)])
    return experts


def _naive(experts: LocalExperts, hidden, ids, weights):
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e < 0 or e not in experts.expert_ids:
                continue
            row = experts.expert_ids.index(e)
            gate, up = F.linear(hidden[t], experts.gate_up_proj[row]).chunk(2)
            out[t] += weights[t, k] * F.linear(F.silu(gate) * up, experts.down_proj[row])
    return out


def test_grouped_executor_equals_per_token_reference():
    hidden = torch.randn(T, H)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    weights = torch.rand(T, K)
    experts = _experts(range(E))
    out = experts(hidden, ids, weights)
    assert out.shape == (T, H)
    torch.testing.assert_close(out, _naive(experts, hidden, ids, weights), atol=1e-5, rtol=1e-5)


def test_subsets_sum_to_the_whole_and_skip_unowned_and_negative_ids():
    hidden = torch.randn(T, H)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    ids[0, 1] = -1
    weights = torch.rand(T, K)
    whole = _experts(range(E))(hidden, ids, weights)
    parts = [_experts((4, 0, 2)), _experts((1, 5)), _experts((3,))]
    total = sum(part(hidden, ids, weights) for part in parts)
    torch.testing.assert_close(total, whole, atol=1e-5, rtol=1e-5)
    assert torch.equal(_experts((3,))(hidden[:0], ids[:0], weights[:0]), hidden[:0])


def test_router_rules():
    hidden = torch.randn(T, H)
    olmoe = Router(H, E, K, "softmax_topk", normalize=False)
    granite = Router(H, E, K, "topk_softmax", normalize=False)
    torch.nn.init.normal_(olmoe.weight)
    granite.weight = olmoe.weight
    ids, weights = olmoe(hidden)
    logits = hidden @ olmoe.weight.T
    expected, expected_ids = torch.softmax(logits, -1).topk(K)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, expected)
    olmoe.normalize = True
    torch.testing.assert_close(olmoe(hidden)[1].sum(-1), torch.ones(T))
    ids, weights = granite(hidden)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, torch.softmax(logits.topk(K).values, -1))


@pytest.mark.parametrize("expert_ids", [(0, 0), (E,), (-1, 2)])
def test_expert_ids_must_be_distinct_and_in_range(expert_ids):
    with pytest.raises(ValueError, match="distinct ids"):
        LocalExperts(_config(), expert_ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_grouping_forms_match_the_reference_and_device_offsets_never_sync(dtype, device):
    """Host counts (float32: the per-expert loop) and device offsets (bfloat16: grouped_mm), on
    `--device`, for a shard's subset with ids it does not own and -1s; with device offsets, no
    host sync (`tests/host_syncs.py`), and with host counts the watch sees the count read back."""
    hidden, weights = torch.randn(T, H), torch.rand(T, K)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    ids[0, 1] = -1
    experts = _experts((4, 0, 2)).to(dtype)
    rounded = lambda x: x.to(dtype).float()  # noqa: E731
    expected = _naive(experts.float(), rounded(hidden), ids, rounded(weights))
    experts = experts.to(device=device, dtype=dtype)
    inputs = hidden.to(device, dtype), ids.to(device), weights.to(device, dtype)
    experts(*inputs)  # NOTE: the first call moves the id table to the device
    with HostSyncs(device) as syncs:
        out = experts(*inputs)
    error = (out.float().cpu() - expected).abs().max() / expected.abs().max()
    assert error < (1e-6 if dtype == torch.float32 else 2e-2)
    assert (syncs.syncs == []) == uses_grouped_mm(dtype)
