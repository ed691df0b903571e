"""Autograd plumbing shared by the op families."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def zeros_for_none(grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Autograd hands ``None`` for outputs that were not used; the backward ops need real tensors."""
    return [torch.zeros_like(r) if g is None else g.contiguous() for g, r in zip(grads, like)]


def split_halves(
    t: torch.Tensor, d: int, k_dtype: torch.dtype, v_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``[..., 2d]`` into fresh contiguous ``[..., d]`` halves (op outputs must not alias)."""
    fmt = torch.contiguous_format
    return t[..., :d].to(k_dtype).clone(memory_format=fmt), t[..., d:].to(v_dtype).clone(memory_format=fmt)


def new_like(t: torch.Tensor) -> torch.Tensor:
    """A fake output of ``t``'s shape and dtype, contiguous (``empty_like`` would copy ``t``'s strides)."""
    return t.new_empty(t.shape)


def contiguous_outputs(out):
    """Op outputs are contiguous (the fake implementations promise it): tensors, lists and tuples thereof."""
    if isinstance(out, torch.Tensor):
        return out.contiguous()
    if isinstance(out, list):
        return [contiguous_outputs(o) for o in out]
    return tuple(contiguous_outputs(o) for o in out)
