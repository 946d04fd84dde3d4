"""The attention rank's dispatch, against shards simulated in this process: which tokens each
shard receives (worked out here from the routing, not from what was sent), the collectives
each mode takes per layer, the bytes counted, and the experts' sum against the whole layer."""

from __future__ import annotations

import pytest
import torch

from moe_serve.cluster.expert_parallel import Dispatcher
from moe_serve.cluster.placement import ExpertLayout, ExpertPlacement
from moe_serve.cluster.shard import payload_row_bytes, unpack_rows
from moe_serve.models.moe import LocalExperts
from moe_serve.models.registry import load_model

# 8 experts on 2 contiguous shards (0-3, 4-7), top-2: tokens for shard 0 only, 1 only, both,
# and one whose two choices are the same shard's
ROUTING = [[0, 1], [0, 5], [6, 7], [3, 4], [2, 3], [7, 1]]


class SimulatedShards:
    """Rank 0's side of the transport; each shard's side computed here with its own experts.
    Records every collective and the token rows each shard received."""

    def __init__(self, shards: list[LocalExperts], config, layout: ExpertLayout) -> None:
        self.shards, self.config, self.layout = shards, config, layout
        self.world_size, self.device = len(shards) + 1, torch.device("cpu")
        self.num_collectives, self.calls = 0, []
        self.received: list[torch.Tensor] = []  # per shard, the last layer's token states
        self.results: list[torch.Tensor] = []

    def _serve(self, shard_rows: list[torch.Tensor]) -> None:
        top_k, size = self.config.num_experts_per_tok, self.config.hidden_size
        unpacked = [unpack_rows(rows, size, top_k, torch.float32) for rows in shard_rows]
        self.received = [hidden for hidden, _, _ in unpacked]
        self.results = [  # NOTE: payloads carry slots (layer 0's); another shard's are -1 here
            experts(hidden, torch.tensor(self.layout.slot_experts(0, shard))[slots], weights)
            for shard, (experts, (hidden, slots, weights)) in enumerate(
                zip(self.shards, unpacked, strict=True)
            )
        ]

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        self.num_collectives += 1
        self.calls.append("broadcast")
        if tensor.dtype == torch.uint8:  # a payload: every shard gets every row
            self._serve([tensor] * len(self.shards))
        return tensor

    def exchange_counts(self, counts: list[int]) -> list[int]:
        self.num_collectives += 1
        self.calls.append("counts")
        return [0] * self.world_size

    def all_to_all(self, send, send_counts, recv_counts):
        self.num_collectives += 1
        self.calls.append("all_to_all")
        if sum(send_counts):  # rows out to the shards, in rank order (rank 0 keeps none)
            self._serve(list(send.split(send_counts[1:])))
            return send.new_empty(0, *send.shape[1:])
        return torch.cat(self.results)

    # NOTE: started collectives run here at once (the order is what the shards see)
    def start_broadcast(self, tensor):
        return self.broadcast(tensor)

    def start_all_to_all(self, send, send_counts, recv_counts):
        return self.all_to_all(send, send_counts, recv_counts), None

    def start_exchange_counts(self, counts):
        return self.exchange_counts(counts), None

    def wait(self, work) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def layer(tiny_dirs):
    model = load_model(str(tiny_dirs["olmoe"]), dtype="float32")
    assert model.config.num_experts == 8 and model.config.num_experts_per_tok == 2
    return model, model.moe_blocks()[0].experts


def run(model, whole: LocalExperts, max_fixed_tokens: int, layout: ExpertLayout | None = None):
    layout = layout or ExpertPlacement(8, 2, "contiguous").layout(model.config.num_layers)
    shards = []
    for expert_ids in layout.layers[0]:
        experts = LocalExperts(model.config, expert_ids)
        experts.gate_up_proj.data = whole.gate_up_proj.data[list(expert_ids)]
        experts.down_proj.data = whole.down_proj.data[list(expert_ids)]
        shards.append(experts)
    transport = SimulatedShards(shards, model.config, layout)
    dispatcher = Dispatcher(layout, model, max_fixed_tokens)
    dispatcher.attach(transport)
    hidden = torch.randn(
        len(ROUTING), model.config.hidden_size, generator=torch.Generator().manual_seed(0)
    )
    ids = torch.tensor(ROUTING)
    weights = torch.tensor([[0.75, 0.25]] * len(ROUTING))
    dispatcher.begin_step([len(ROUTING)])
    out = dispatcher.dispatch(0, hidden, ids, weights)
    return hidden, ids, weights, out, transport, dispatcher.snapshot()


def expected_tokens(shard: int) -> list[int]:
    return [t for t, choice in enumerate(ROUTING) if any(e // 4 == shard for e in choice)]


@pytest.mark.parametrize("mode", ["exact", "fixed"])
def test_dispatch_sums_the_layer_and_counts_the_minimum_bytes(layer, mode):
    model, whole = layer
    hidden, ids, weights, out, transport, stats = run(model, whole, 0 if mode == "exact" else 64)
    torch.testing.assert_close(out, whole(hidden, ids, weights), rtol=1e-5, atol=1e-6)
    row = 64 * 4  # hidden x float32
    num_pairs = sum(len(expected_tokens(s)) for s in range(2))
    assert num_pairs == 9  # worked out by hand from ROUTING: 5 tokens for shard 0, 4 for 1
    assert stats.min_bytes == 2 * num_pairs * row
    assert stats.expert_tokens[0] == (2, 2, 1, 2, 1, 1, 1, 2)  # ROUTING's ids, counted by hand
    if mode == "exact":  # each token once to each shard holding one of its experts, no more
        for shard in range(2):
            assert torch.equal(transport.received[shard], hidden[expected_tokens(shard)])
        assert transport.calls == ["broadcast", "counts", "all_to_all", "all_to_all"]
        assert stats.bytes_received == num_pairs * row
    else:  # every token to every shard; no count exchange
        for shard in range(2):
            assert torch.equal(transport.received[shard], hidden)
        assert transport.calls == ["broadcast", "broadcast", "all_to_all"]
        assert stats.bytes_received == 2 * len(ROUTING) * row
        assert stats.bytes_sent == 2 * len(ROUTING) * payload_row_bytes(64, torch.float32, 2)
    assert stats.num_collectives == len(transport.calls)
    assert (stats.num_steps, stats.num_fixed_steps) == (1, int(mode == "fixed"))


def test_fixed_and_exact_dispatch_give_the_same_sums(layer):
    model, whole = layer
    exact, fixed = run(model, whole, 0)[3], run(model, whole, 64)[3]
    assert torch.equal(exact, fixed)


def test_a_step_above_the_fixed_capacity_is_exact(layer):
    model, whole = layer
    *_, transport, stats = run(model, whole, len(ROUTING) - 1)
    assert "counts" in transport.calls and stats.num_fixed_steps == 0


# experts 0 and 7 have a copy on each shard: slots 0-4 are shard 0's (0, 1, 2, 3, 7), 5-9 shard
# 1's (0, 4, 5, 6, 7). ROUTING's pairs of expert 0 (tokens 0, 1) and of 7 (tokens 2, 5) go to
# their copies in turn: token 0 and 2 to shard 0, 1 and 5 to shard 1.
REDUNDANT = ((0, 1, 2, 3, 7), (0, 4, 5, 6, 7))


@pytest.mark.parametrize("mode", ["exact", "fixed"])
def test_redundant_copies_split_an_experts_tokens_and_compute_each_pair_once(layer, mode):
    model, whole = layer
    layout = ExpertLayout(8, (REDUNDANT,) * model.config.num_layers)
    hidden, ids, weights, out, transport, stats = run(
        model, whole, 0 if mode == "exact" else 64, layout
    )
    torch.testing.assert_close(out, whole(hidden, ids, weights), rtol=1e-5, atol=1e-6)
    # (token, k) pairs per shard, by hand: shard 0 computes t0: 0, 1; t2: 7; t3: 3; t4: 2, 3;
    # t5: 1 (7 pairs); shard 1 t1: 0, 5; t2: 6; t3: 4; t5: 7 (5 pairs)
    assert stats.shard_tokens[0] == (7, 5)
    assert stats.expert_tokens[0] == (2, 2, 1, 2, 1, 1, 1, 2)  # logical: as without copies
    if mode == "exact":
        assert torch.equal(transport.received[0], hidden[[0, 2, 3, 4, 5]])
        assert torch.equal(transport.received[1], hidden[[1, 2, 3, 5]])
        assert stats.min_bytes == 2 * 9 * 64 * 4


def test_a_layout_leaves_no_expert_out_and_repeats_none_within_a_shard():
    assert ExpertLayout.decode(ExpertLayout(8, (REDUNDANT,)).encode(), 8, 1, 2).layers == (
        REDUNDANT,
    )
    with pytest.raises(ValueError, match=r"experts \[7\] are on no shard"):
        ExpertLayout(8, (((0, 1, 2, 3), (4, 5, 6)),))
    with pytest.raises(ValueError, match="empty or repeats"):
        ExpertLayout(8, (((0, 1, 2, 3, 3), (4, 5, 6, 7)),))
