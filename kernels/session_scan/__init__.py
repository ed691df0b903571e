"""``mka::session_scan`` (+ ``_backward``): the L2 session EMA with carried float32 state.

:mod:`.reference` holds the math, the torch reference, the argument checks and the op registration (CPU =
reference, fake, autograd); :mod:`.triton_kernels` the Triton kernels and launchers, registered as the CUDA
implementation when triton is installed.
"""

from __future__ import annotations

from .reference import reference_session_scan, session_scan

try:  # triton is optional (Linux-only); without it CUDA runs the reference
    from . import triton_kernels  # noqa: F401  (registers the CUDA kernels)
except ModuleNotFoundError as _err:  # pragma: no cover - exercised only where triton is missing
    if _err.name != "triton":
        raise

__all__ = ["reference_session_scan", "session_scan"]
