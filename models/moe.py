"""The MoE interface: a router (top-k ids and weights) and an experts executor.

Shapes: T tokens, E experts, K top-k, H hidden, I expert intermediate size.
The executor here runs experts in-process; `cluster/` installs an expert-parallel executor with
the same `forward(hidden, topk_ids, topk_weights)` contract through `MoeBlock.experts`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_serve.models.config import ModelConfig, RouterRule
from moe_serve.models.layers import ACTIVATIONS, linear


class Router(nn.Module):
    """Router logits -> top-k expert ids [T, K] and weights [T, K] (in the hidden dtype)."""

    def __init__(
        self, hidden_size: int, num_experts: int, top_k: int, rule: RouterRule, normalize: bool
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.top_k, self.rule, self.normalize = top_k, rule, normalize

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(hidden, self.weight)
        if self.rule == "softmax_topk":  # OLMoE: softmax over all experts, then top-k
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            weights, ids = torch.topk(probs, self.top_k, dim=-1)
            if self.normalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        else:  # JetMoE / Granite: top-k logits, softmax over those
            top_logits, ids = torch.topk(logits.float(), self.top_k, dim=-1)
            weights = torch.softmax(top_logits, dim=-1)
        return ids, weights.to(hidden.dtype)


class BaseExperts(nn.Module, ABC):
    """Executes routed experts: out[t] = sum_k topk_weights[t, k] * expert[topk_ids[t, k]](x[t])."""

    @abstractmethod
    def forward(
        self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden [T, H], topk_ids [T, K] (expert ids; -1 = none), topk_weights [T, K] -> [T, H]."""

    def start(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        """`forward` in two halves, so that the caller can compute something else while the
        experts run elsewhere (expert parallelism): start, then `finish` what it returned.
        Here, in process, start computes and finish hands the result back."""
        return self(hidden, topk_ids, topk_weights)

    def finish(self, pending) -> torch.Tensor:
        return pending


@dataclass(frozen=True)
class ExpertGroups:
    """Routing entries grouped by expert, in one of two forms:
    - host counts (the per-expert loop): `order` [N'] the valid entries (id >= 0) sorted by
      expert, `counts` [E] a host list: reading it back is a host sync;
    - device offsets (`F.grouped_mm`): `order` [N] every entry, valid ones sorted by expert
      then the invalid ones, `offsets` [E] int32 end row of each expert's group and `is_valid`
      [N] in that order, all on the device: no host sync, and shapes fixed by N.
    `order` holds indices into the flat [T, K] routing."""

    order: torch.Tensor
    counts: list[int] | None = None
    offsets: torch.Tensor | None = None
    is_valid: torch.Tensor | None = None


def uses_grouped_mm(dtype: torch.dtype) -> bool:
    # NOTE: measured on CPU at 16 tokens x top-4 of 32 experts: bf16 grouped_mm 2.8 ms/layer
    # against 4.9 looping; float32 grouped_mm 7.7 ms against 2.9 looping with `linear`.
    return dtype == torch.bfloat16 and hasattr(F, "grouped_mm")


def group_by_expert(expert_ids: torch.Tensor, num_experts: int, dtype: torch.dtype) -> ExpertGroups:
    """Flat expert ids [N] (-1: none) -> their `ExpertGroups`, device offsets where `dtype`'s
    rows go through `F.grouped_mm`, else host counts."""
    if not uses_grouped_mm(dtype):
        order = torch.argsort(expert_ids, stable=True)
        num_invalid = int((expert_ids < 0).sum())
        order = order[num_invalid:]
        counts = torch.bincount(expert_ids[order], minlength=num_experts).tolist()
        return ExpertGroups(order, counts=counts)
    key = torch.where(expert_ids < 0, num_experts, expert_ids)  # NOTE: invalid ones sort last
    order = torch.argsort(key, stable=True)
    sizes = torch.zeros(num_experts + 1, dtype=torch.long, device=key.device)
    sizes.scatter_add_(0, key, torch.ones_like(key))  # NOTE: not bincount: its size syncs
    offsets = sizes[:num_experts].cumsum(0).to(torch.int32)
    return ExpertGroups(order, offsets=offsets, is_valid=key[order] < num_experts)


def grouped_linear(x: torch.Tensor, groups: ExpertGroups, weight: torch.Tensor) -> torch.Tensor:
    """Rows of x [N, in] in `groups.order`, weight [E, out, in] -> [N, out]: each expert's
    matmul runs once over its own rows (with device offsets, rows past the last group are
    left undefined: `combine_by_token` drops them)."""
    if groups.offsets is not None:
        return F.grouped_mm(x, weight.transpose(1, 2), offs=groups.offsets)
    parts = x.split(groups.counts)
    outs = [linear(rows, weight[e]) for e, rows in enumerate(parts) if rows.shape[0]]
    return torch.cat(outs) if outs else x.new_empty(0, weight.shape[1])


def combine_by_token(
    out: torch.Tensor, groups: ExpertGroups, topk_weights: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Expert outputs [N, H] in `groups.order` -> the routing-weighted sum per token [T, H]."""
    order = groups.order
    out = out * topk_weights.flatten()[order, None]
    if groups.is_valid is not None:  # NOTE: where, not a product: undefined rows may be NaN
        out = torch.where(groups.is_valid[:, None], out, 0)
    top_k = topk_weights.shape[1]
    return out.new_zeros(num_tokens, out.shape[1]).index_add_(0, order // top_k, out)


class LocalExperts(BaseExperts):
    """A set of SwiGLU-style experts held in-process, computed grouped by expert.

    `expert_ids` are the global ids held here (row e of the weights is expert_ids[e]); the
    router's global ids are translated to rows, so a shard can hold any subset.
    """

    def __init__(self, config: ModelConfig, expert_ids: Sequence[int]) -> None:
        super().__init__()
        if len(set(expert_ids)) != len(expert_ids) or not all(
            0 <= e < config.num_experts for e in expert_ids
        ):
            raise ValueError(
                f"expert_ids must be distinct ids in [0, {config.num_experts}), got {expert_ids}"
            )
        num_local, hidden, inter = len(expert_ids), config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_local, 2 * inter, hidden))  # [E, 2I, H]
        self.down_proj = nn.Parameter(torch.empty(num_local, hidden, inter))  # [E, H, I]
        self.act = ACTIVATIONS[config.hidden_act]
        self.expert_ids = tuple(expert_ids)
        table = [-1] * (config.num_experts + 1)  # NOTE: the last entry serves id -1
        for row, expert_id in enumerate(expert_ids):
            table[expert_id] = row
        self.row_of = torch.tensor(table, dtype=torch.long, device="cpu")

    def forward(self, hidden, topk_ids, topk_weights):
        top_k = topk_ids.shape[1]
        if self.row_of.device != topk_ids.device:
            self.row_of = self.row_of.to(topk_ids.device)
        rows = self.row_of[topk_ids.flatten()]  # [T*K]
        groups = group_by_expert(rows, len(self.expert_ids), hidden.dtype)
        inter = self.down_proj.shape[2]
        picked = hidden[groups.order // top_k]
        gate_up = grouped_linear(picked, groups, self.gate_up_proj)  # [N, 2I]
        act = self.act(gate_up[:, :inter]) * gate_up[:, inter:]  # [N, I]
        out = grouped_linear(act, groups, self.down_proj)  # [N, H]
        return combine_by_token(out, groups, topk_weights, hidden.shape[0])


class MoeBlock(nn.Module):
    """Router + experts executor (+ JetMoE's output bias)."""

    def __init__(self, config: ModelConfig, expert_ids: Sequence[int]) -> None:
        super().__init__()
        self.gate = Router(
            config.hidden_size,
            config.num_experts,
            config.num_experts_per_tok,
            config.router_rule,
            config.norm_topk_prob,
        )
        self.experts: BaseExperts = LocalExperts(config, expert_ids)
        self.bias = nn.Parameter(torch.empty(config.hidden_size)) if config.is_moe_bias else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.finish(self.start(hidden))

    def start(self, hidden: torch.Tensor):
        """Route and start the experts (`BaseExperts.start`); `finish` returns [T, H]."""
        topk_ids, topk_weights = self.gate(hidden)
        return self.experts.start(hidden, topk_ids, topk_weights)

    def finish(self, pending) -> torch.Tensor:
        out = self.experts.finish(pending)
        return out + self.bias if self.bias is not None else out
