"""The attention rank's side of expert parallelism: an experts executor per MoE layer that
dispatches tokens to the shards over the transport (protocol in `cluster/shard.py`).

Shapes: T tokens, K top-k, H hidden, E experts, N shards, L MoE layers, S slots of a layer
(expert copies, numbered shard after shard: `ExpertLayout`), C most copies of one expert.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moe_serve.cluster.dispatch_counters import DispatchCounters
from moe_serve.cluster.overlap import OverlapConfig, OverlapPolicy
from moe_serve.cluster.placement import ExpertLayout
from moe_serve.cluster.runner import ModelRunner
from moe_serve.cluster.shard import MAX_MICRO_BATCHES, Command, pack_rows, payload_row_bytes
from moe_serve.cluster.stats import DispatchStats
from moe_serve.cluster.transport import CollectiveTransport, TransportError, Work
from moe_serve.models.base import MoeForCausalLM
from moe_serve.models.moe import BaseExperts


@dataclass(frozen=True)
class PendingDispatch:
    """One micro-batch's layer in flight: its collectives and where the results land."""

    works: tuple[Work, ...]
    results: torch.Tensor  # fixed: [N * T, H], shard after shard; exact: [sum n_s, H]
    num_tokens: int
    order: torch.Tensor | None  # exact: the token of each result row; fixed: None


class ShardFailure(RuntimeError):
    """An expert shard of this replica died, hung or could not be reached."""


def _step_failure(exc: TransportError) -> ShardFailure:
    return ShardFailure(
        f"an expert shard of this replica failed or timed out; the "
        f"replica is restarting its shards ({exc})"
    )


class Dispatcher:
    """Sends each step's header and each layer's tokens, by the current `ExpertLayout` (a token
    goes to the shards holding the copies its experts' slots name); swapped onto a new
    transport when the replica rebuilds its shards. A layer's dispatch is `start`ed without
    waiting and `finish`ed when its result is needed (micro-batch overlap).

    Two modes, chosen per step from its largest micro-batch T (the shards read it in the
    header):
    - fixed capacity (T <= `max_fixed_tokens`, decode-sized): every token goes to every shard
      in one broadcast, and each shard returns T rows (zeros for tokens none of its experts
      serve): 2 collectives per layer, no count exchange, no host sync; the rows sent beyond
      the minimum are the tokens a shard has no expert for.
    - exact: each token goes once to each shard holding one of its experts: 3 collectives per
      layer (counts, rows, results) and bytes at the minimum, at the price of host syncs.
    """

    def __init__(
        self, layout: ExpertLayout, model: MoeForCausalLM, max_fixed_tokens: int = 64
    ) -> None:
        cfg = model.config
        self.top_k, self.hidden_size = cfg.num_experts_per_tok, cfg.hidden_size
        self.max_fixed_tokens, self.is_fixed = max_fixed_tokens, False
        self.device = torch.device("cpu")
        self.counters = DispatchCounters(cfg.num_layers, cfg.num_experts, layout.num_shards)
        self.transport: CollectiveTransport | None = None
        self._set_layout(layout)

    def _set_layout(self, layout: ExpertLayout) -> None:
        """The slot tables, on the dispatch device: slot_shard [L, S], copies [L, E, C] (padded
        with the expert's first copy), num_copies [L, E]."""
        self.layout, num_layers = layout, layout.num_layers
        copies = [layout.copies(layer) for layer in range(num_layers)]
        most = max(len(c) for layer in copies for c in layer)
        num_slots = max(len(layout.slot_shards(layer)) for layer in range(num_layers))
        as_long = lambda rows: torch.tensor(rows, dtype=torch.long, device=self.device)  # noqa: E731
        self.slot_shard = as_long(
            [
                shards + [0] * (num_slots - len(shards))
                for shards in map(layout.slot_shards, range(num_layers))
            ]
        )
        self.copies = as_long([[c + c[:1] * (most - len(c)) for c in layer] for layer in copies])
        self.num_copies = as_long([[len(c) for c in layer] for layer in copies])
        self.is_redundant = most > 1
        self.shards = torch.arange(layout.num_shards, device=self.device)

    def attach(self, transport: CollectiveTransport) -> None:
        self.detach()
        self.transport, self.device = transport, transport.device
        self._set_layout(self.layout)
        self.counters.to(transport.device)

    def detach(self) -> None:
        """Abort the group (`CollectiveTransport.close`); its collectives stay counted."""
        if self.transport is not None:
            self.counters.num_collectives += self.transport.num_collectives
            self.transport.close()
            self.transport = None

    def snapshot(self) -> DispatchStats:
        return self.counters.snapshot(self.transport.num_collectives if self.transport else 0)

    def _send_header(self, command: Command, sizes: Sequence[int] = ()) -> None:
        if self.transport is None:
            raise ShardFailure(
                "the expert shards of this replica are not connected (a rebuild is pending)"
            )
        # NOTE: a blocking host-to-device copy on CUDA, once per step, before its forward pass
        # (the stream is idle then: the last step's tokens were read back)
        padding = [0] * (MAX_MICRO_BATCHES - len(sizes))
        words = [int(command), int(self.is_fixed), *sizes, *padding]  # shard.HEADER_WORDS
        device = self.transport.device
        self.transport.broadcast(torch.tensor(words, dtype=torch.long, device=device))

    def ping(self) -> None:
        try:
            self._send_header(Command.PING)
            self.transport.ack()
        except TransportError as exc:
            raise ShardFailure(f"an idle expert shard stopped answering ({exc})") from exc

    def stop(self) -> None:
        self._send_header(Command.STOP)

    def apply_layout(self, layout: ExpertLayout) -> None:
        """Between steps: every shard loads its experts of `layout`; the next step dispatches by
        it. Returns once every shard has acknowledged (raises ShardFailure otherwise)."""
        words = layout.encode()
        try:
            self._send_header(Command.PLACE, [len(words)])
            self.transport.broadcast(torch.tensor(words, dtype=torch.long, device=self.device))
            # NOTE: the shards load their new experts before they answer: within the timeout
            self.transport.ack()
        except TransportError as exc:
            raise _step_failure(exc) from exc
        self._set_layout(layout)
        with self.counters.lock:
            self.counters.num_layouts += 1

    def begin_step(self, micro_batch_tokens: Sequence[int]) -> None:
        """Open a step on the shards before its forward pass, with the token count of each of
        its micro-batches (one, or two overlapped): they then take one round of collectives
        per MoE layer and micro-batch, in layer order, micro-batches in turn."""
        self.is_fixed = max(micro_batch_tokens) <= self.max_fixed_tokens
        try:
            self._send_header(Command.STEP, micro_batch_tokens)
        except TransportError as exc:
            raise _step_failure(exc) from exc
        with self.counters.lock:
            self.counters.num_steps += 1
            self.counters.num_fixed_steps += self.is_fixed
            self.counters.num_overlapped_steps += len(micro_batch_tokens) > 1

    def start(
        self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> PendingDispatch:
        """Send hidden [T, H] with its routing topk_ids/weights [T, K] to the shards without
        waiting; `finish` returns the experts' weighted sum [T, H]."""
        try:
            if self.is_fixed:
                return self._start_fixed(layer, hidden, topk_ids, topk_weights)
            return self._start_exact(layer, hidden, topk_ids, topk_weights)
        except TransportError as exc:
            raise _step_failure(exc) from exc

    def finish(self, pending: PendingDispatch) -> torch.Tensor:
        try:
            for work in pending.works:
                self.transport.wait(work)
        except TransportError as exc:
            raise _step_failure(exc) from exc
        results, num_tokens = pending.results, pending.num_tokens
        if pending.order is not None:  # exact: the shards' rows, in the order sent
            return results.new_zeros(num_tokens, self.hidden_size).index_add_(
                0, pending.order, results
            )
        out = results[:num_tokens]
        for shard in range(1, self.layout.num_shards):  # NOTE: in shard order, as exact adds
            out = out + results[shard * num_tokens : (shard + 1) * num_tokens]
        return out

    def dispatch(
        self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """`start` and `finish` at once: [T, H] -> the experts' weighted sum [T, H]."""
        return self.finish(self.start(layer, hidden, topk_ids, topk_weights))

    def _slots(self, layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """[T, K] expert ids -> the slot computing each: with copies, an expert's (token, k)
        pairs go to its copies in turn (the n-th to copy n mod copies: an even split)."""
        if not self.is_redundant:
            return self.copies[layer, :, 0][topk_ids]
        flat = topk_ids.flatten()
        seen = torch.nn.functional.one_hot(flat, self.copies.shape[1]).cumsum(0)  # [T*K, E]
        rank = seen.gather(1, flat[:, None]).squeeze(1) - 1  # earlier pairs of the same expert
        pick = rank % self.num_copies[layer, flat]
        return self.copies[layer, flat, pick].view_as(topk_ids)

    def _start_fixed(self, layer, hidden, topk_ids, topk_weights):
        # NOTE: for a given T, static shapes and no host sync: what a CUDA graph of a decode
        # step needs (the step's header is broadcast before the forward pass, outside it)
        transport, num_shards, num_tokens = self.transport, self.layout.num_shards, len(hidden)
        slots = self._slots(layer, topk_ids)
        rows = pack_rows(hidden, slots, topk_weights)
        sent = transport.start_broadcast(rows)
        sent.keep = rows
        receive = [0] + [num_tokens] * num_shards
        results, back = transport.start_all_to_all(hidden[:0], [0] * transport.world_size, receive)
        owner = self.slot_shard[layer, slots]  # [T, K]
        hits = (owner.unsqueeze(-1) == self.shards).any(dim=1)  # [T, N]
        self._count(layer, topk_ids, owner, hidden, num_shards * num_tokens, hits.sum())
        return PendingDispatch((sent, back), results, num_tokens, None)

    def _start_exact(self, layer, hidden, topk_ids, topk_weights):
        # NOTE: host syncs, by design of this mode: nonzero() per shard to size a variable
        # all-to-all (rank 0 sends the counts; it never waits to read any back)
        transport = self.transport
        slots = self._slots(layer, topk_ids)
        owner = self.slot_shard[layer, slots]  # [T, K]
        token_ids = [
            (owner == s).any(dim=1).nonzero().squeeze(1) for s in range(self.layout.num_shards)
        ]  # tokens per shard, once each
        counts = [0] + [int(t.numel()) for t in token_ids]  # NOTE: rank 0 keeps none
        _, told = transport.start_exchange_counts(counts)
        order = torch.cat(token_ids)  # [sum n_s]
        rows = pack_rows(hidden[order], slots[order], topk_weights[order])
        _, sent = transport.start_all_to_all(rows, counts, [0] * transport.world_size)
        results, back = transport.start_all_to_all(hidden[:0], [0] * transport.world_size, counts)
        self._count(layer, topk_ids, owner, hidden, order.numel(), order.numel())
        return PendingDispatch((told, sent, back), results, len(hidden), order)

    def _count(self, layer, topk_ids, owner, hidden, num_rows: int, min_rows) -> None:
        """`num_rows` token rows went out (and as many came back); `min_rows` (an int or a
        tensor on the device) is the (token, shard) pairs the routing needs; `owner` [T, K] the
        shard computing each (token, k)."""
        row_bytes = self.hidden_size * hidden.element_size()
        counters = self.counters
        flat = topk_ids.flatten()  # NOTE: not bincount, whose output size needs a host sync
        owner = owner.flatten()
        with counters.lock:
            counters.expert_tokens[layer].scatter_add_(0, flat, torch.ones_like(flat))
            counters.shard_tokens[layer].scatter_add_(0, owner, torch.ones_like(owner))
            counters.bytes_sent += num_rows * payload_row_bytes(
                self.hidden_size, hidden.dtype, self.top_k
            )
            counters.bytes_received += num_rows * row_bytes
            counters.min_bytes += 2 * row_bytes * min_rows  # NOTE: both ways


class ExpertParallelExecutor(BaseExperts):
    """The experts of one MoE layer, living on the shards: `start` sends, `finish` waits (the
    model computes another micro-batch in between)."""

    def __init__(self, dispatcher: Dispatcher, layer: int) -> None:
        super().__init__()
        self.dispatcher, self.layer = dispatcher, layer

    def forward(self, hidden, topk_ids, topk_weights):
        return self.dispatcher.dispatch(self.layer, hidden, topk_ids, topk_weights)

    def start(self, hidden, topk_ids, topk_weights):
        return self.dispatcher.start(self.layer, hidden, topk_ids, topk_weights)

    def finish(self, pending):
        return self.dispatcher.finish(pending)


def install_expert_parallel(
    runner: ModelRunner, dispatcher: Dispatcher, overlap: OverlapConfig | None = None
) -> None:
    """Replace every MoE layer's experts with the expert-parallel executor, and open a step on
    the shards before each of the runner's forward passes (with its micro-batches' sizes);
    `overlap` decides which steps run as two overlapped micro-batches (default: none)."""
    for layer, block in enumerate(runner.model.moe_blocks()):
        block.experts = ExpertParallelExecutor(dispatcher, layer)
    runner.step_hook = dispatcher.begin_step
    runner.overlap = OverlapPolicy(overlap or OverlapConfig("off"))
