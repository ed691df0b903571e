"""Building the C++ extension of the fused CPU memory pass (``extension.cpp`` with ``forward.h``, ``backward.h``).

It is compiled on first use by :mod:`kernels._cpp` (about a minute, cached per machine). Without a C++ compiler,
or with ``MKA_CPU_FUSED=0``, there is none: the ops of this family then run their reference (the composed ``mka::``
ops) on the CPU too, and the engine does not pick them (:func:`built` is False).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .._cpp import ENV, _ninja_on_path, load  # noqa: F401  (_ninja_on_path: tests call it here)

HERE = Path(__file__).parent


def extension():
    """The compiled module, or None (turned off, or it does not build here; a warning says why, once)."""
    return load("mka_fastmka_memory_cpu", HERE, "the fused CPU memory path")


@torch.compiler.assume_constant_result
def built() -> bool:
    """Whether the extension is there (built on the first call): a constant of the process, also to torch.compile."""
    return extension() is not None
