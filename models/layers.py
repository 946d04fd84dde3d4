"""Shared building blocks: RMSNorm, activations, rotary embeddings."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moe_serve.models.config import RopeConfig

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


# NOTE: measured with CPU MKL: `x @ W.T` for a few rows of x reads a cold weight at ~5 GB/s,
# `W @ x.T` streams it 2-4x faster (never slower up to 128 rows), and one row takes a gemv
# path 3x slower than two rows, so a lone row is computed as two. Few rows meeting large
# weights is the decode case: expert FFNs, projections and the LM head.
SMALL_BATCH_ROWS = 128
LARGE_WEIGHT_ROWS = 4096


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, laid out for speed on CPU when x [N, in] has few rows."""
    rows = x.shape[0]
    if x.device.type != "cpu" or x.dim() != 2 or not 0 < rows <= SMALL_BATCH_ROWS:
        return F.linear(x, weight, bias)
    # NOTE: the fast path needs x row-major: x.T must be a transposed view, not a copy.
    x_t = (torch.cat((x, x)) if rows == 1 else x.contiguous()).T
    if weight.shape[0] > LARGE_WEIGHT_ROWS:  # NOTE: LM head: slices stay in cache (-20%)
        out = torch.cat([w @ x_t for w in weight.split(LARGE_WEIGHT_ROWS)]).T[:rows]
    else:
        out = (weight @ x_t).T[:rows]
    return out + bias if bias is not None else out


class Linear(nn.Linear):
    """nn.Linear (same parameters) computed with `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """RMS norm computed in float32, scaled in the input dtype (as transformers does)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class RotaryEmbedding:
    """cos/sin tables for rotate-half RoPE; plain object so models can be built on `meta`.

    Dynamic NTK scaling follows transformers per sequence: a sequence whose length `L` exceeds
    the original context rotates this step's tokens with the base recomputed for `L`.
    """

    def __init__(self, rope: RopeConfig, head_dim: int) -> None:
        self.rope = rope
        self.head_dim = head_dim
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def inv_freq(self, seq_len: int | None = None) -> torch.Tensor:
        rope, dim = self.rope, self.head_dim
        base = rope.theta
        if rope.scaling_type == "dynamic" and seq_len and seq_len > rope.original_max_position:
            ratio = rope.factor * seq_len / rope.original_max_position - (rope.factor - 1)
            base = base * ratio ** (dim / (dim - 2))
        inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv / rope.factor if rope.scaling_type == "linear" else inv

    def _table(self, length: int, device: torch.device, dtype: torch.dtype):
        cached = self._cache.get((device, dtype))
        if cached is None or cached[0].shape[0] < length:
            size = max(length, 2 * (cached[0].shape[0] if cached else 0), 4096)
            cos, sin = self._cos_sin(torch.arange(size, dtype=torch.float32), self.inv_freq())
            cached = (cos.to(device, dtype), sin.to(device, dtype))
            self._cache[(device, dtype)] = cached
        return cached

    @staticmethod
    def _cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor):
        freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def cos_sin(
        self,
        positions: torch.Tensor,
        seq_lens: torch.Tensor | None,
        dtype: torch.dtype,
        max_seq_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] and each token's sequence length [T] -> cos, sin [T, D] in `dtype`;
        `max_seq_len` (a host int: no sync) bounds every position."""
        cos_t, sin_t = self._table(max_seq_len, positions.device, dtype)
        cos, sin = cos_t[positions], sin_t[positions]
        if self.rope.scaling_type != "dynamic" or seq_lens is None:
            return cos, sin
        for length in seq_lens.unique().tolist():
            if length <= self.rope.original_max_position:
                continue
            rows = (seq_lens == length).nonzero().squeeze(1)
            c, s = self._cos_sin(positions[rows], self.inv_freq(length))
            cos[rows], sin[rows] = c.to(dtype), s.to(dtype)
        return cos, sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D], cos/sin [T, D]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + rotate_half(x) * sin
