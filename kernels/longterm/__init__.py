"""``mka::chunk_update`` (+ ``_backward``) and ``mka::recall_select``: the L3 chunk summaries and recall.

:mod:`.reference` holds the math, the torch references, the argument checks, the op registration (CPU =
reference, fake, autograd) and the recall helpers; :mod:`.triton_kernels` the Triton kernels and launchers,
registered as the CUDA implementation when triton is installed.
"""

from __future__ import annotations

from .reference import (
    real_positions,
    recall_mask,
    recall_mix,
    recall_probs,
    reference_chunk_update,
    reference_recall_select,
)

try:  # triton is optional (Linux-only); without it CUDA runs the reference
    from . import triton_kernels  # noqa: F401  (registers the CUDA kernels)
except ModuleNotFoundError as _err:  # pragma: no cover - exercised only where triton is missing
    if _err.name != "triton":
        raise

__all__ = [
    "real_positions",
    "recall_mask",
    "recall_mix",
    "recall_probs",
    "reference_chunk_update",
    "reference_recall_select",
]
