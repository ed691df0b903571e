"""mka-compile: find attention in PyTorch models and rewrite it into MKA / FastMKA.

:func:`inspect` finds attention sites; :func:`convert` converts them; :func:`save_converted` /
:func:`load_converted` (one file) and :func:`save_pretrained` / :func:`from_pretrained` (a Hugging Face folder)
keep a converted model with its mode and config; :class:`Rule` / :class:`PassManager` run custom passes;
:class:`MKAConfig`, the ``mka::`` custom ops (:mod:`mka_compile.kernels`) and the layers
(:mod:`mka_compile.layers`) carry the MKA semantics.
"""

from __future__ import annotations

from mka_compile import kernels, layers
from mka_compile.bounded_bank import MemoryBank
from mka_compile.cache_report import memory_report
from mka_compile.checkpoint import load_converted, save_converted
from mka_compile.config import MKAConfig
from mka_compile.conversion import ConversionError, convert, memory_parameters, routing_stats
from mka_compile.export import export_onnx
from mka_compile.graph.capture import Captured, CaptureError, capture
from mka_compile.graph.pattern import any_, op, opt
from mka_compile.graph.rules import PassError, PassManager, Rule
from mka_compile.hf.bounded import bounded_cache, memory_bank
from mka_compile.inspection import inspect
from mka_compile.layers import FastMKAAttention, MKAAttention, MKACache
from mka_compile.pretrained import from_pretrained, save_pretrained
from mka_compile.report import Report, Site

__version__ = "0.1.0"

__all__ = [
    "CaptureError",
    "Captured",
    "ConversionError",
    "FastMKAAttention",
    "MKAAttention",
    "MKACache",
    "MKAConfig",
    "MemoryBank",
    "PassError",
    "PassManager",
    "Report",
    "Rule",
    "Site",
    "__version__",
    "any_",
    "bounded_cache",
    "capture",
    "convert",
    "export_onnx",
    "from_pretrained",
    "inspect",
    "kernels",
    "layers",
    "memory_bank",
    "memory_parameters",
    "memory_report",
    "load_converted",
    "op",
    "opt",
    "routing_stats",
    "save_converted",
    "save_pretrained",
]
