"""ONNX export of (converted) models: ``mka::`` ops become ``com.mka`` nodes, each defined by a model-local
function of standard ONNX ops, so stock ONNX Runtime runs the file.

- :func:`export_onnx` writes the full forward or (``decode_step=True``) one cached step;
- :func:`ort_session` opens a file with ONNX Runtime (CUDA first when available);
- :class:`OnnxDecoder` drives a decode-step file, keeping past K/V and the MKA state between calls.
"""

from __future__ import annotations

from .exporter import ExportError, export_onnx
from .runtime import OnnxDecoder, ort_session, providers
from .schemas import DOMAIN, register_schemas

__all__ = ["DOMAIN", "ExportError", "OnnxDecoder", "export_onnx", "ort_session", "providers", "register_schemas"]
