"""An expert shard: a slice of every MoE layer's experts, driven by collectives.

Per-step protocol (rank 0 is the attention actor):
  header   broadcast [command]: STEP, PING (keepalive), STOP
  STEP, for each MoE layer in order:
    counts   all-to-all: rank 0 tells shard s how many tokens it sends (n_s)
    payload  all-to-all: n_s rows of bytes, each a token state [H] (model dtype) followed by
             its top-k global expert ids and weights [2K] (float32); a token goes to a shard
             once, however many of its experts live there
    results  all-to-all back: [n_s, H], the token's experts on this shard, summed with
             their routing weights (weights are applied here, on the shard)
Shapes: H hidden, K top-k.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch

from moe_serve.cluster.transport import CollectiveTransport
from moe_serve.models.moe import LocalExperts
from moe_serve.models.registry import load_model


def pack_rows(
    hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """hidden [n, H] and routing [n, K] x 2 -> one byte row per token [n, H*size + 8K]."""
    routing = torch.cat([topk_ids.float(), topk_weights.float()], dim=1)
    return torch.cat([hidden.contiguous().view(torch.uint8), routing.view(torch.uint8)], dim=1)


def payload_row_bytes(hidden_size: int, dtype: torch.dtype, top_k: int) -> int:
    """Bytes of one `pack_rows` row: the hidden state, then K ids and K weights as float32."""
    return hidden_size * dtype.itemsize + 8 * top_k


def unpack_rows(rows: torch.Tensor, hidden_size: int, top_k: int, dtype: torch.dtype):
    """Inverse of `pack_rows` -> hidden [n, H], topk_ids [n, K], topk_weights [n, K]."""
    hidden_bytes = rows.shape[1] - 8 * top_k
    hidden = rows[:, :hidden_bytes].contiguous().view(dtype)
    routing = rows[:, hidden_bytes:].contiguous().view(torch.float32)
    if hidden.shape[1] != hidden_size:
        raise ValueError(f"payload rows carry {hidden.shape[1]} hidden values, not {hidden_size}")
    return hidden, routing[:, :top_k].long(), routing[:, top_k:].to(dtype)


class Command(enum.IntEnum):
    STEP = 1
    PING = 2
    STOP = 3


def is_mlp_expert(name: str) -> bool:
    """Parameters that live on shards (JetMoE's attention experts stay with attention)."""
    return ".mlp.experts." in name


class ExpertShard:
    """Loads only `expert_ids` of every MoE layer and serves them until told to stop."""

    def __init__(
        self,
        checkpoint: str,
        expert_ids: Sequence[int],
        dtype: str | None,
        device: str | torch.device,
    ) -> None:
        model = load_model(
            checkpoint, dtype=dtype, device=device, expert_ids=expert_ids, wanted=is_mlp_expert
        )
        self.config = model.config
        self.device = torch.device(device)
        self.experts: list[LocalExperts] = [block.experts for block in model.moe_blocks()]
        self.dtype = self.experts[0].gate_up_proj.dtype
        self.num_steps = 0

    def parameter_summary(self) -> dict[str, tuple[int, ...]]:
        """Shape of every materialised parameter (the dense model is never loaded here)."""
        return {
            f"layers.{i}.{name}": tuple(p.shape)
            for i, experts in enumerate(self.experts)
            for name, p in experts.named_parameters()
        }

    def serve(self, transport: CollectiveTransport) -> int:
        """Run the protocol until STOP; returns the number of steps served."""
        header = torch.zeros(1, dtype=torch.long, device=self.device)
        while True:
            command = int(transport.broadcast(header)[0])
            if command == Command.STOP:
                return self.num_steps
            if command == Command.STEP:
                for experts in self.experts:
                    self._layer(transport, experts)
                self.num_steps += 1

    @torch.inference_mode()
    def _layer(self, transport: CollectiveTransport, experts: LocalExperts) -> None:
        world, hidden_size = transport.world_size, self.config.hidden_size
        top_k = self.config.num_experts_per_tok
        recv_counts = transport.exchange_counts([0] * world)
        nothing = [0] * world
        row_bytes = payload_row_bytes(hidden_size, self.dtype, top_k)
        rows = transport.all_to_all(
            torch.empty(0, row_bytes, dtype=torch.uint8, device=self.device), nothing, recv_counts
        )
        hidden, topk_ids, topk_weights = unpack_rows(rows, hidden_size, top_k, self.dtype)
        transport.all_to_all(experts(hidden, topk_ids, topk_weights), recv_counts, nothing)
