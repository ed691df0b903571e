"""The ``mka::`` custom ops: one module per op family (reference, registration; Triton on GPU).

Importing this package registers every op with ``torch.library``:

- ``mka::session_scan`` (+ ``_backward``): L2 session EMA with carried float32 state;
- ``mka::chunk_update`` (+ ``_backward``) and ``mka::recall_select``: L3 chunk summaries and recall;
- ``mka::route_mix`` (+ ``_backward``): FastMKA's routed mix of K/V levels;
- ``mka::fastmka_mix`` (+ ``_backward``): FastMKA's memory path fused (session scan, route-mix, RoPE);
- ``mka::mka_attention`` (+ ``_backward``): MKA's multi-level attention;
- ``mka::flash_attention`` (+ ``_backward``): plain attention sites (GQA, causal, masks);
- ``mka::decode_attention``: split-K attention for one or a few query tokens (inference only).

With triton installed, the ``*_triton`` modules register Triton kernels as the CUDA implementations.
"""

from __future__ import annotations

from . import fastmka_memory_cpu  # noqa: F401  (the fused CPU memory path; built on first use)
from .decode_attention import decode_attention, reference_decode_attention
from .fastmka_mix import fastmka_mix, reference_fastmka_mix, rope_tables
from .flash_attention import flash_attention, reference_flash_attention
from .longterm import (
    real_positions,
    recall_mask,
    recall_mix,
    recall_probs,
    reference_chunk_update,
    reference_recall_select,
)
from .mka_attention import mka_attention, reference_mka_attention, visibility
from .route_mix import reference_route_mix, route_mix
from .session_scan import reference_session_scan, session_scan

OPS = (
    "session_scan",
    "session_scan_backward",
    "chunk_update",
    "chunk_update_backward",
    "recall_select",
    "route_mix",
    "route_mix_backward",
    "fastmka_mix",
    "fastmka_mix_backward",
    "mka_attention",
    "mka_attention_backward",
    "flash_attention",
    "flash_attention_backward",
    "decode_attention",
)

__all__ = [
    "OPS",
    "decode_attention",
    "fastmka_mix",
    "flash_attention",
    "mka_attention",
    "real_positions",
    "recall_mask",
    "recall_mix",
    "recall_probs",
    "reference_chunk_update",
    "reference_decode_attention",
    "reference_fastmka_mix",
    "reference_flash_attention",
    "reference_mka_attention",
    "reference_recall_select",
    "reference_route_mix",
    "reference_session_scan",
    "rope_tables",
    "route_mix",
    "session_scan",
    "visibility",
]
