"""mka-compile: find attention in PyTorch models and rewrite it into MKA / FastMKA.

This release ships the foundation: :class:`MKAConfig`, the ``mka::`` custom ops
(:mod:`mka_compile.kernels`) and the layers (:mod:`mka_compile.layers`).
"""

from __future__ import annotations

from mka_compile import kernels, layers
from mka_compile.config import MKAConfig
from mka_compile.layers import FastMKAAttention, MKAAttention, MKACache

__version__ = "0.1.0"

__all__ = ["FastMKAAttention", "MKAAttention", "MKACache", "MKAConfig", "__version__", "kernels", "layers"]
