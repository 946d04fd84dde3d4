"""What the attention rank's dispatcher counts (`cluster/expert_parallel.py`): routed tokens per
expert and per shard, bytes, steps, layouts; read from any thread as a `DispatchStats`."""

from __future__ import annotations

import threading

import torch

from moe_serve.cluster.stats import DispatchStats


class DispatchCounters:
    """Per-layer, per-expert routed token counts and bytes moved (read from any thread). The
    per-layer counts live on the dispatch device and are only added to there: counting costs
    the hot loop no host sync; a snapshot pays one."""

    def __init__(self, num_layers: int, num_experts: int, num_shards: int) -> None:
        self.expert_tokens = torch.zeros(num_layers, num_experts, dtype=torch.long)
        self.shard_tokens = torch.zeros(num_layers, num_shards, dtype=torch.long)  # (token, k)
        self.num_layouts = 0  # layouts applied after the first (EPLB)
        self.num_overlapped_steps = 0  # steps run as two micro-batches
        self.min_bytes = torch.zeros((), dtype=torch.long)
        self.bytes_sent = self.bytes_received = self.num_steps = self.num_fixed_steps = 0
        self.num_collectives = 0  # of transports already replaced (see Dispatcher.attach)
        self.lock = threading.Lock()

    def to(self, device: torch.device) -> None:
        with self.lock:
            self.expert_tokens = self.expert_tokens.to(device)
            self.shard_tokens = self.shard_tokens.to(device)
            self.min_bytes = self.min_bytes.to(device)

    def snapshot(self, num_collectives: int) -> DispatchStats:
        with self.lock:
            return DispatchStats(
                tuple(map(tuple, self.expert_tokens.tolist())),
                self.bytes_sent,
                self.bytes_received,
                int(self.min_bytes),
                self.num_steps,
                self.num_fixed_steps,
                self.num_collectives + num_collectives,
                tuple(map(tuple, self.shard_tokens.tolist())),
                self.num_layouts,
                self.num_overlapped_steps,
            )
