"""The memory step of one site call as one op: ``mka::memory_mix`` (FastMKA: routing weights, session EMA, chunk
summaries, causal top-R recall and the routed mix) and ``mka::memory_levels`` (MKA mode: the same step, returning
the levels its attention reads), with a fused C++ pass as their CPU kernel.

:mod:`.reference` holds the math, the definition (the composition of ``mka::session_scan``, ``chunk_update``,
``recall_select`` + ``recall_mix``, ``route_mix`` and the gated routing), the checks and the op declarations;
:mod:`.cpu` the calls into the C++ pass (``extension.cpp`` with ``forward.h`` and ``backward.h``), built on first use
by :mod:`.build`. Eager runs, ``torch.compile`` and ``torch.export`` see the same op; the C++ pass exists because,
at the sizes of a converted small model, the composed ops spend most of their time in per-op overhead (about 3 ms
per layer at T=1024, next to 14 ms for the layer). Without a C++ compiler, or with ``MKA_CPU_FUSED=0``, the
engine runs the composed ops instead (same results, slower).
"""

from __future__ import annotations

from .build import ENV, built, extension
from .reference import (
    effective_gate,
    gated_routing,
    memory_levels,
    memory_mix,
    reference_memory_levels,
    reference_memory_mix,
    supports,
)

__all__ = [
    "ENV",
    "built",
    "effective_gate",
    "extension",
    "gated_routing",
    "memory_levels",
    "memory_mix",
    "reference_memory_levels",
    "reference_memory_mix",
    "supports",
]
