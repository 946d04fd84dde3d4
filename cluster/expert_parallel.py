"""The attention rank's side of expert parallelism: an experts executor per MoE layer that
dispatches tokens to the shards over the transport (protocol in `cluster/shard.py`).

Shapes: T tokens, K top-k, H hidden, E experts, N shards.
"""

from __future__ import annotations

import threading

import torch

from moe_serve.cluster.placement import ExpertPlacement
from moe_serve.cluster.runner import ModelRunner
from moe_serve.cluster.shard import Command, pack_rows, payload_row_bytes
from moe_serve.cluster.stats import DispatchStats
from moe_serve.cluster.transport import CollectiveTransport, TransportError
from moe_serve.models.base import MoeForCausalLM
from moe_serve.models.moe import BaseExperts


class ShardFailure(RuntimeError):
    """An expert shard of this replica died, hung or could not be reached."""


def _step_failure(exc: TransportError) -> ShardFailure:
    return ShardFailure(
        f"an expert shard of this replica failed or timed out; the "
        f"replica is restarting its shards ({exc})"
    )


class DispatchCounters:
    """Per-layer, per-expert routed token counts and bytes moved (read from any thread)."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.expert_tokens = torch.zeros(num_layers, num_experts, dtype=torch.long)
        self.bytes_sent = self.bytes_received = self.min_bytes = self.num_steps = 0
        self.lock = threading.Lock()

    def snapshot(self) -> DispatchStats:
        with self.lock:
            return DispatchStats(
                tuple(map(tuple, self.expert_tokens.tolist())),
                self.bytes_sent,
                self.bytes_received,
                self.min_bytes,
                self.num_steps,
            )


class Dispatcher:
    """Sends each step's header and each layer's tokens; swapped onto a new transport when the
    replica rebuilds its shards."""

    def __init__(self, placement: ExpertPlacement, model: MoeForCausalLM) -> None:
        cfg = model.config
        self.placement, self.top_k, self.hidden_size = (
            placement,
            cfg.num_experts_per_tok,
            cfg.hidden_size,
        )
        self.shard_of = torch.tensor(placement.shard_of, dtype=torch.long)
        self.counters = DispatchCounters(cfg.num_layers, cfg.num_experts)
        self.transport: CollectiveTransport | None = None

    def attach(self, transport: CollectiveTransport) -> None:
        self.transport = transport
        self.shard_of = self.shard_of.to(transport.device)

    def _send_header(self, command: Command) -> None:
        if self.transport is None:
            raise ShardFailure(
                "the expert shards of this replica are not connected (a rebuild is pending)"
            )
        header = torch.tensor([int(command)], dtype=torch.long, device=self.transport.device)
        self.transport.broadcast(header)

    def ping(self) -> None:
        try:
            self._send_header(Command.PING)
        except TransportError as exc:
            raise ShardFailure(f"an idle expert shard stopped answering ({exc})") from exc

    def stop(self) -> None:
        self._send_header(Command.STOP)

    def begin_step(self) -> None:
        """Open a step on the shards, before each forward pass: they then take one round of
        all-to-alls per MoE layer, in layer order."""
        try:
            self._send_header(Command.STEP)
        except TransportError as exc:
            raise _step_failure(exc) from exc
        with self.counters.lock:
            self.counters.num_steps += 1

    def dispatch(
        self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden [T, H], topk_ids/weights [T, K] -> the experts' weighted sum [T, H]."""
        try:
            return self._dispatch(layer, hidden, topk_ids, topk_weights)
        except TransportError as exc:
            raise _step_failure(exc) from exc

    def _dispatch(self, layer, hidden, topk_ids, topk_weights):
        transport = self.transport
        shard_of = self.shard_of[topk_ids]  # [T, K]
        token_ids = [
            (shard_of == s).any(dim=1).nonzero().squeeze(1)
            for s in range(self.placement.num_shards)
        ]  # tokens per shard, once each
        counts = [0] + [int(t.numel()) for t in token_ids]  # NOTE: rank 0 keeps none
        transport.exchange_counts(counts)
        order = torch.cat(token_ids)  # [sum n_s]
        rows = pack_rows(hidden[order], topk_ids[order], topk_weights[order])
        transport.all_to_all(rows, counts, [0] * transport.world_size)
        results = transport.all_to_all(hidden[:0], [0] * transport.world_size, counts)
        self._count(layer, topk_ids, order.numel(), hidden)
        return torch.zeros_like(hidden).index_add_(0, order, results)

    def _count(self, layer: int, topk_ids: torch.Tensor, rows: int, hidden: torch.Tensor) -> None:
        row_bytes = self.hidden_size * hidden.element_size()
        counters = self.counters
        routed = torch.bincount(topk_ids.flatten(), minlength=counters.expert_tokens.shape[1])
        with counters.lock:
            counters.expert_tokens[layer] += routed.cpu()
            counters.bytes_sent += rows * payload_row_bytes(
                self.hidden_size, hidden.dtype, self.top_k
            )
            counters.bytes_received += rows * row_bytes
            counters.min_bytes += 2 * rows * row_bytes  # NOTE: tokens x distinct shards, both ways


class ExpertParallelExecutor(BaseExperts):
    """The experts of one MoE layer, living on the shards."""

    def __init__(self, dispatcher: Dispatcher, layer: int) -> None:
        super().__init__()
        self.dispatcher, self.layer = dispatcher, layer

    def forward(self, hidden, topk_ids, topk_weights):
        return self.dispatcher.dispatch(self.layer, hidden, topk_ids, topk_weights)


def install_expert_parallel(runner: ModelRunner, dispatcher: Dispatcher) -> None:
    """Replace every MoE layer's experts with the expert-parallel executor, and open a step on
    the shards before each of the runner's forward passes."""
    for layer, block in enumerate(runner.model.moe_blocks()):
        block.experts = ExpertParallelExecutor(dispatcher, layer)
    runner.step_hook = dispatcher.begin_step
