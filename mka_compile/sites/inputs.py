"""What a converted site reads off its call: which cache it got, which tokens are real, and whether a call may
take the eager shortcuts (a real tensor; a hook-free ``nn.Linear`` is :func:`mka_compile.sites.hooks.plain_linear`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def real_eager(x: Any) -> bool:
    """``x`` is a plain tensor in eager mode: not traced, compiled, fake or under a dispatch mode."""
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode

    return type(x) is torch.Tensor and not torch.compiler.is_compiling() and not is_in_torch_dispatch_mode()


def is_cache(x: Any) -> bool:
    return hasattr(x, "get_seq_length") and hasattr(x, "update") and not isinstance(x, (torch.Tensor, nn.Module))


def valid_tokens(mask: Any, B: int, T: int, cache_position: Any, device) -> torch.Tensor:
    """``[B, T]``: which of this call's tokens are real, read from the site's attention mask.

    A 4-D mask ``[B, 1, Tq, Tk]`` (bool keep, or additive) marks a padded query by masking its own key
    (the diagonal, at ``cache_position`` or bottom-right); a 2-D mask ``[B, Tk]`` is read directly."""
    if not isinstance(mask, torch.Tensor):
        return torch.ones(B, T, dtype=torch.bool, device=device)
    keep = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    if keep.dim() == 2:
        return keep[:, -T:].expand(B, T).to(device)
    if keep.dim() != 4:
        return torch.ones(B, T, dtype=torch.bool, device=device)
    tq, tk = keep.shape[-2], keep.shape[-1]
    if isinstance(cache_position, torch.Tensor) and cache_position.numel() == T:
        cols = cache_position.to(keep.device).long()
    else:
        cols = torch.arange(T, device=keep.device) + (tk - tq)
    rows = torch.arange(T, device=keep.device) + (tq - T)
    diag = keep[:, 0, rows, cols.clamp(max=tk - 1)]  # (B or 1, T)
    return diag.expand(B, T).to(device)
