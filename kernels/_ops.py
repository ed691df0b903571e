"""What ``mka_compile.kernels`` exports (see the package docstring); kept apart from ``__init__`` so that the
package can hand over to an installed top-level ``kernels`` when imported by that name (``_checkout``)."""

from __future__ import annotations

from . import fastmka_memory_cpu  # noqa: F401  (the fused CPU memory path; built on first use)
from .bounded_attention import bounded_attention, reference_bounded_attention
from .flash_attention import flash_attention, reference_flash_attention
from .longterm import *  # noqa: F403  (the L3 references and recall helpers: longterm.__all__)
from .longterm import __all__ as _LONGTERM
from .mka_attention import mka_attention, reference_mka_attention, visibility
from .route_mix import reference_route_mix, route_mix
from .session_scan import reference_session_scan, session_scan

OPS = (
    "bounded_attention",
    "bounded_attention_backward",
    "session_scan",
    "session_scan_backward",
    "chunk_update",
    "chunk_update_backward",
    "recall_select",
    "route_mix",
    "route_mix_backward",
    "mka_attention",
    "mka_attention_backward",
    "flash_attention",
    "flash_attention_backward",
)

__all__ = [
    "OPS",
    "bounded_attention",
    "reference_bounded_attention",
    "flash_attention",
    "mka_attention",
    *_LONGTERM,
    "reference_flash_attention",
    "reference_mka_attention",
    "reference_route_mix",
    "reference_session_scan",
    "route_mix",
    "session_scan",
    "visibility",
]
