"""An expert shard: a slice of every MoE layer's experts, driven by collectives.

Per-step protocol (rank 0 is the attention actor):
  header   broadcast [command, is_fixed, T_0, T_1]: STEP (micro-batches of T_0 and T_1
           tokens; T_1 = 0: one), PING (keepalive), STOP, PLACE (a new layout of T_0 words
           follows: EPLB, between steps)
  PING:    ack      count exchange (all zeros): a round trip, so a hung shard is noticed
  PLACE:   layout   broadcast: `ExpertLayout.encode()`; every shard loads its new experts
           ack      count exchange (all zeros) once loaded: the next step may start
  STEP, for each MoE layer in order, for each micro-batch in turn (the attention rank computes
  one micro-batch's attention while the shards compute the other's experts), in the mode the
  header names (see `Dispatcher`):
    fixed capacity (decode-sized steps):
      payload  broadcast: all T rows (the row format below) to every shard
      results  all-to-all back: [T, H] from each shard (zeros where none of its experts serve)
    exact:
      counts   all-to-all: rank 0 tells shard s how many tokens it sends (n_s)
      payload  all-to-all: n_s rows; a token goes to a shard once, however many of its experts
               live there
      results  all-to-all back: [n_s, H]
  A payload row is bytes: a token state [H] (model dtype), then its top-k slots (which copy of
  each expert computes it: the layout's slot numbers) and weights [2K] (float32); a result row
  is the token's experts on this shard, summed with their routing weights (applied here).
Shapes: H hidden, K top-k, T tokens in the step.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch
from torch import nn

from moe_serve.cluster.placement import ExpertLayout
from moe_serve.cluster.transport import CollectiveTransport
from moe_serve.models.moe import LocalExperts
from moe_serve.models.registry import load_config, load_model


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


MAX_MICRO_BATCHES = 2
# command, fixed-capacity mode (1) or exact (0), then each micro-batch's token count
HEADER_WORDS = 2 + MAX_MICRO_BATCHES


class Command(enum.IntEnum):
    STEP = 1
    PING = 2
    STOP = 3
    PLACE = 4


def is_mlp_expert(name: str) -> bool:
    """Parameters that live on shards (JetMoE's attention experts stay with attention)."""
    return ".mlp.experts." in name


class ExpertShard:
    """Loads only its experts of every MoE layer (shard `index` of `layout`) and serves them
    until told to stop; takes a new layout between steps (PLACE)."""

    def __init__(
        self,
        checkpoint: str,
        layout: ExpertLayout,
        index: int,
        dtype: str | None,
        device: str | torch.device,
    ) -> None:
        self.checkpoint, self.index, self.dtype_name = checkpoint, index, dtype
        self.device = torch.device(device)
        self.num_steps = 0
        self.config = load_config(checkpoint)
        self.experts = self._read(layout.shard_experts(index))
        self.dtype = self.experts[0].gate_up_proj.dtype
        self._set_layout(layout)

    def _read(self, layer_expert_ids: Sequence[Sequence[int]]) -> list[LocalExperts]:
        """These experts of each layer, from the checkpoint (nothing else is read)."""
        model = load_model(
            self.checkpoint,
            dtype=self.dtype_name,
            device=self.device,
            layer_expert_ids=layer_expert_ids,
            wanted=is_mlp_expert,
        )
        return [block.experts for block in model.moe_blocks()]

    def _move_to(self, layout: ExpertLayout) -> None:
        """Hold `layout`'s experts: the ones already here are kept (copied in the new order),
        only the others are read from the checkpoint."""
        wanted = layout.shard_experts(self.index)
        held = [set(experts.expert_ids) for experts in self.experts]
        new = self._read(
            [[e for e in ids if e not in h] for ids, h in zip(wanted, held, strict=True)]
        )
        moved = []
        for ids, old, fresh in zip(wanted, self.experts, new, strict=True):
            sources = {e: (old, row) for row, e in enumerate(old.expert_ids)}
            sources |= {e: (fresh, row) for row, e in enumerate(fresh.expert_ids)}
            with torch.device("meta"):
                experts = LocalExperts(self.config, ids)
            for name in ("gate_up_proj", "down_proj"):
                rows = [getattr(sources[e][0], name)[sources[e][1]] for e in ids]
                setattr(experts, name, nn.Parameter(torch.stack(rows), requires_grad=False))
            moved.append(experts)
        self.experts = moved
        self._set_layout(layout)

    def _set_layout(self, layout: ExpertLayout) -> None:
        self.layout = layout
        self.expert_of_slot = [  # [layer] -> [slot] -> expert id if held here, else -1
            torch.tensor(layout.slot_experts(layer, self.index), device=self.device)
            for layer in range(layout.num_layers)
        ]

    def parameter_summary(self) -> dict[str, tuple[int, ...]]:
        """Shape of every materialised parameter (the dense model is never loaded here)."""
        return {
            f"layers.{i}.{name}": tuple(p.shape)
            for i, experts in enumerate(self.experts)
            for name, p in experts.named_parameters()
        }

    def serve(self, transport: CollectiveTransport) -> int:
        """Run the protocol until STOP; returns the number of steps served."""
        header = torch.zeros(HEADER_WORDS, dtype=torch.long, device=self.device)
        while True:
            # NOTE: one host sync per step, here on the shard: its loop branches on the header
            command, is_fixed, *sizes = transport.broadcast(header).tolist()
            if command == Command.STOP:
                return self.num_steps
            if command == Command.STEP:
                layer = self._fixed_layer if is_fixed else self._exact_layer
                sizes = [size for size in sizes if size]
                for index, experts in enumerate(self.experts):
                    for num_tokens in sizes:
                        layer(transport, index, experts, num_tokens)
                self.num_steps += 1
            elif command == Command.PLACE:
                self._place(transport, sizes[0])
            elif command == Command.PING:
                transport.ack()

    def _place(self, transport: CollectiveTransport, num_words: int) -> None:
        words = torch.zeros(num_words, dtype=torch.long, device=self.device)
        words = transport.broadcast(words).tolist()
        layout = self.layout
        self._move_to(
            ExpertLayout.decode(words, layout.num_experts, layout.num_layers, layout.num_shards)
        )
        transport.ack()

    def _rows(self, num_rows: int) -> torch.Tensor:
        top_k = self.config.num_experts_per_tok
        row_bytes = payload_row_bytes(self.config.hidden_size, self.dtype, top_k)
        return torch.empty(num_rows, row_bytes, dtype=torch.uint8, device=self.device)

    def _compute(self, layer: int, experts: LocalExperts, rows: torch.Tensor) -> torch.Tensor:
        top_k = self.config.num_experts_per_tok
        hidden, slots, weights = unpack_rows(rows, self.config.hidden_size, top_k, self.dtype)
        # NOTE: slots of other shards' copies become -1, which the experts skip
        return experts(hidden, self.expert_of_slot[layer][slots], weights)

    @torch.inference_mode()
    def _fixed_layer(self, transport, layer: int, experts: LocalExperts, num_tokens: int) -> None:
        rows = transport.broadcast(self._rows(num_tokens))
        back = [num_tokens] + [0] * (transport.world_size - 1)
        out = self._compute(layer, experts, rows)
        transport.all_to_all(out, back, [0] * transport.world_size)

    @torch.inference_mode()
    def _exact_layer(self, transport, layer: int, experts: LocalExperts, num_tokens: int) -> None:
        nothing = [0] * transport.world_size
        recv_counts = transport.exchange_counts(nothing)
        rows = transport.all_to_all(self._rows(0), nothing, recv_counts)
        transport.all_to_all(self._compute(layer, experts, rows), recv_counts, nothing)
