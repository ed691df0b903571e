"""Autograd plumbing shared by the op families."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def zeros_for_none(grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Autograd hands ``None`` for outputs that were not used; the backward ops need real tensors."""
    return [torch.zeros_like(r) if g is None else g.contiguous() for g, r in zip(grads, like)]
