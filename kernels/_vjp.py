"""Backward of an op as the vector-Jacobian product of its differentiable reference.

The CPU implementation of a ``mka::<family>_backward`` op recomputes the family's pure-torch
reference and takes its VJP with ``torch.func.vjp`` (which works inside an op implementation, where
the autograd dispatch keys are excluded). The reference *is* the definition, so this backward is
exact by construction; Triton implementations replace it on GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def reference_vjp(
    reference: Callable[..., Sequence[torch.Tensor]],
    diff_inputs: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """Gradients of ``reference(*diff_inputs)`` (a tuple of tensors) w.r.t. ``diff_inputs``.

    ``grads`` holds one cotangent per output. Integer/bool outputs take no cotangent.
    """
    with torch.enable_grad():
        outs, vjp_fn = torch.func.vjp(lambda *xs: tuple(reference(*xs)), *diff_inputs)
        cot = tuple(
            g.to(o.dtype) if o.is_floating_point() else torch.zeros_like(o)
            for o, g in zip(outs, grads)
        )
        got = vjp_fn(cot)
    return [g.contiguous() for g in got]


def zeros_for_none(grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Autograd hands ``None`` for outputs that were not used; ops need real tensors."""
    return [torch.zeros_like(r) if g is None else g.contiguous() for g, r in zip(grads, like)]
