"""Next-token selection: penalties, temperature, top-k/top-p/min-p, seeded sampling, logprobs.

Shapes: B sampling rows, V vocabulary, R rows with a grammar.
Logprobs are those of the model's distribution before penalties, grammar masks and temperature
(what the model said, not what the filters kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_serve.cluster.params import SamplingParams


@dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token's logprob and the top-N alternatives (N = requested logprobs)."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class TokenMask:
    """The tokens each constrained row may take next, as a logits bias (built off the main
    thread: see cluster/grammar.py)."""

    row_indices: list[int]  # the constrained rows of the batch, in order
    bias: torch.Tensor  # [R, V'] float32: 0 allowed, -inf forbidden (V' >= V; excess ignored)


@dataclass
class SamplingRow:
    """What the sampler needs about one sequence."""

    params: SamplingParams
    token_ids: list[int]  # prompt + output so far (repetition penalty)
    num_prompt_tokens: int
    generator: torch.Generator


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    for i, row in enumerate(rows):
        params = row.params
        if not params.has_penalties:
            continue
        device = logits.device
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.token_ids)), dtype=torch.long, device=device)
            values = logits[i, seen]
            logits[i, seen] = torch.where(
                values > 0, values / params.repetition_penalty, values * params.repetition_penalty
            )
        outputs = row.token_ids[row.num_prompt_tokens :]
        if outputs and (params.presence_penalty or params.frequency_penalty):
            counts = torch.bincount(
                torch.tensor(outputs, device=device), minlength=logits.shape[1]
            ).to(logits.dtype)
            logits[i] -= params.frequency_penalty * counts
            logits[i] -= params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def apply_token_mask(logits: torch.Tensor, mask: TokenMask) -> torch.Tensor:
    """-inf on every token a row's grammar forbids, in place; other rows are untouched."""
    device = logits.device
    rows = torch.tensor(mask.row_indices, device=device)
    # NOTE: an add, not masked_fill: 20x faster on CPU for [16, 50k]
    return logits.index_add_(0, rows, mask.bias[:, : logits.shape[1]].to(device))


def _filter(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p as -inf masks -> probabilities [B, V]."""
    device = logits.device
    temperature = torch.tensor([r.params.temperature for r in rows], device=device)
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    top_k = [r.params.top_k if r.params.top_k > 0 else logits.shape[1] for r in rows]
    top_p = [r.params.top_p for r in rows]
    min_p = [r.params.min_p for r in rows]
    if any(k < logits.shape[1] for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        ranks = torch.arange(logits.shape[1], device=device)[None, :]
        sorted_probs = sorted_probs.masked_fill(
            ranks >= torch.tensor(top_k, device=device)[:, None], 0.0
        )
        sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)  # top-p after top-k
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # NOTE: mass ahead of each token
        drop = before >= torch.tensor(top_p, device=device)[:, None]
        probs = probs.scatter(1, order, sorted_probs.masked_fill(drop, 0.0))
    if any(min_p):
        floor = torch.tensor(min_p, device=device)[:, None] * probs.max(dim=-1, keepdim=True)[0]
        probs = probs.masked_fill(probs < floor, 0.0)
    return probs


def _sample(probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Exponential-race sampling with each row's own generator: the draw of a row does not
    depend on the other rows of the batch, so a seed reproduces whatever the batch."""
    noise = torch.empty_like(probs)
    for i, row in enumerate(rows):
        noise[i].exponential_(generator=row.generator)
    return (probs / noise).argmax(dim=-1)


def token_logprobs(logprobs: torch.Tensor, token_id: torch.Tensor, num: int) -> TokenLogprobs:
    """One row's logprobs [V] -> the chosen token's and the top `num`."""
    chosen = logprobs[token_id]
    rank = int((logprobs > chosen).sum()) + 1
    top = ()
    if num:
        values, ids = logprobs.topk(num)
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprobs(int(token_id), float(chosen), rank, top)


def sample(
    logits: torch.Tensor, rows: list[SamplingRow], mask: TokenMask | None = None
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """logits [B, V] float32 -> next token per row and, where asked, its logprobs; `mask`:
    the grammar masks of the constrained rows, if any."""
    wants_logprobs = [r.params.logprobs is not None for r in rows]
    raw = torch.log_softmax(logits, dim=-1) if any(wants_logprobs) else None
    if any(r.params.has_penalties for r in rows):
        logits = _apply_penalties(logits.clone(), rows)
    if mask is not None:
        logits = apply_token_mask(logits.clone(), mask)
    tokens = logits.max(dim=-1).indices  # NOTE: argmax's result, 2x faster on CPU
    random_rows = [i for i, r in enumerate(rows) if not r.params.is_greedy]
    if random_rows:
        subset = [rows[i] for i in random_rows]
        index = torch.tensor(random_rows, device=logits.device)
        tokens[index] = _sample(_filter(logits[index], subset), subset)
    token_list = tokens.tolist()
    logprobs = [
        token_logprobs(raw[i], tokens[i], rows[i].params.logprobs) if wants else None
        for i, wants in enumerate(wants_logprobs)
    ]
    return token_list, logprobs
