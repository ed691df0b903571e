"""``mka::bounded_attention`` (+ ``_backward``): each query attends to its own list of keys, gathered from a pool.

:mod:`.reference` holds the math, the torch reference, the RoPE moves, the argument checks and the op
registration (fake, autograd); :mod:`.cpu` the forward's C++ CPU kernel (``extension.cpp``, built on first use;
the reference where it does not build); :mod:`.triton_kernels` the forward Triton kernel and launcher,
:mod:`.triton_backward` the backward's, registered as the CUDA implementations when triton is installed.
"""

from __future__ import annotations

from . import cpu  # noqa: F401  (register the CPU kernel)
from .reference import bounded_attention, reference_bounded_attention, rotate_by, rotate_cs

try:  # triton is optional (Linux-only); without it CUDA runs the reference
    from . import triton_backward, triton_kernels  # noqa: F401  (register the CUDA kernels)
except ModuleNotFoundError as _err:  # pragma: no cover - exercised only where triton is missing
    if _err.name != "triton":
        raise

__all__ = ["bounded_attention", "reference_bounded_attention", "rotate_by", "rotate_cs"]
