"""The CPU kernel of ``mka::bounded_attention``'s forward: ``extension.cpp`` (one pass per query over its gathered
entries, no temporaries), built on first use by :mod:`kernels._cpp`; float32 and float64. The reference stays the
op's definition, its backward and the kernel for other dtypes (and where the extension does not build,
``MKA_CPU_FUSED=0``). At decode sizes the reference spends its time in per-op overhead (about 0.4 ms per call for
one query over a few hundred entries); the kernel in tens of microseconds."""

from __future__ import annotations

from pathlib import Path

import torch

from .._cpp import load
from .reference import BOUNDED_ATTENTION

HERE = Path(__file__).parent


def extension():
    """The compiled module, or None (turned off, or it does not build here; a warning says why, once)."""
    return load("mka_bounded_attention_cpu", HERE, "the CPU kernel of mka::bounded_attention")


def _bounded_attention_cpu(q, k, v, idx, delta, freqs, scale, interleaved, run=1):
    args = (q, k, v, idx, delta, freqs, scale, interleaved, run)
    ext = extension() if q.dtype in (torch.float32, torch.float64) else None
    if ext is None:
        return BOUNDED_ATTENTION(*args)
    BOUNDED_ATTENTION.check_all(*args)
    out, lse = ext.forward(q, k, v, idx, delta, freqs, float(scale), bool(interleaved))
    return out, lse


torch.library.register_kernel(BOUNDED_ATTENTION.name, "cpu", _bounded_attention_cpu)
