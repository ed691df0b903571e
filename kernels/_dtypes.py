"""The accumulation dtype every reference shares: float64 for float64 inputs (gradcheck), else float32."""

from __future__ import annotations

import torch


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32
