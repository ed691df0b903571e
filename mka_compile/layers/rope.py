"""Rotary position embedding (rotate-half convention) at explicit per-row positions."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """``forward(x: [B, h, T, d], pos: [B, T]) -> [B, h, T, d]`` rotating pairs ``(i, i + d/2)``.

    Angles are computed in float32 (float64 for float64 inputs) and applied in the input dtype.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        self.head_dim = head_dim
        self.base = float(base)

    def frequencies(self, device=None) -> torch.Tensor:
        """``[d/2]`` float64: the angle per position of each pair."""
        exps = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device) / self.head_dim
        return 1.0 / self.base**exps

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        adt = torch.float64 if x.dtype == torch.float64 else torch.float32
        inv_freq = self.frequencies(x.device).to(adt)
        ang = pos.to(adt)[:, None, :, None] * inv_freq  # (B, 1, T, d/2)
        cos = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype)
        sin = torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat([-x2, x1], -1) * sin
