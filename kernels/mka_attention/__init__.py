"""``mka::mka_attention`` (+ ``_backward``): MKA's multi-level attention.

:mod:`.reference` holds the math, the torch reference, the argument checks and the op registration (CPU =
reference, fake, autograd); :mod:`.triton_launch` the Triton launchers, registered as the CUDA implementation
when triton is installed, over the forward kernels of :mod:`.triton_kernels` and the backward kernels of
:mod:`.triton_backward`.
"""

from __future__ import annotations

from .reference import mka_attention, reference_mka_attention, visibility

try:  # triton is optional (Linux-only); without it CUDA runs the reference
    from . import triton_launch  # noqa: F401  (registers the CUDA kernels)
except ModuleNotFoundError as _err:  # pragma: no cover - exercised only where triton is missing
    if _err.name != "triton":
        raise

__all__ = ["mka_attention", "reference_mka_attention", "visibility"]
