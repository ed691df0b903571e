"""``custom_translation_table`` for ``torch.onnx.export``: each ``mka::`` op becomes ONE ``com.mka`` node.

The functions run under the exporter's tracer (onnxscript): they receive ONNX values for tensor arguments
and Python values for the rest. Lists of level tensors are stacked on a new leading axis with standard ops
(``Unsqueeze`` + ``Concat``) so that every ``com.mka`` node has a fixed number of inputs.
"""

from __future__ import annotations

import onnxscript
import torch
from onnxscript import ir
from onnxscript import opset18 as op

from .schemas import DOMAIN, VERSION, register_schemas

register_schemas()  # the tracer looks the schemas up when a com.mka node is built
mka = onnxscript.values.Opset(DOMAIN, VERSION)


def _stack(values):
    return op.Concat(*[op.Unsqueeze(v, [0]) for v in values], axis=0)


def session_scan(k, v, valid, state_k, state_v, n_seen, beta: float):
    return mka.SessionScan(k, v, valid, state_k, state_v, n_seen, beta=beta)


def chunk_update(k, v, valid, n_seen, part_k, part_v, summ_k, summ_v, chunk_size: int):
    return mka.ChunkUpdate(k, v, valid, n_seen, part_k, part_v, summ_k, summ_v, chunk_size=chunk_size)


def recall_select(q_r, summ_k, pos, chunk_size: int, top_r: int, bank_k=None, bank_valid=None):
    if bank_k is not None:  # the exporter checks this first and names the site; kept here as a guard
        raise NotImplementedError("mka::recall_select with an external memory bank has no ONNX function yet")
    return mka.RecallSelect(q_r, summ_k, pos, chunk_size=chunk_size, top_r=top_r)


def route_mix(lam, ks, vs):
    return mka.RouteMix(lam, _stack(ks), _stack(vs))


def mka_attention(q, ks, vs, lam, q3, mem_k, mem_v, idx3, found3, kv_valid, scale: float, causal: bool):
    attrs = dict(scale=scale, causal=int(causal))
    R = idx3.shape[3] if idx3.shape is not None else None
    if R == 0:  # no L3 level
        return mka.MKAAttention(q, _stack(ks), _stack(vs), lam, kv_valid, **attrs)
    return mka.MKAAttentionRecall(q, _stack(ks), _stack(vs), lam, kv_valid, q3, mem_k, mem_v, idx3, found3, **attrs)


def flash_attention(q, k, v, mask, scale: float, causal: bool):
    attrs = dict(scale=scale, causal=int(causal))
    if mask is None:
        out, lse = mka.FlashAttention(q, k, v, **attrs)
    else:
        if mask.dtype == ir.DataType.BOOL:  # keep-mask -> additive
            mask = op.Where(mask, op.Constant(value_float=0.0), op.Constant(value_float=float("-inf")))
        out, lse = mka.FlashAttentionMasked(q, k, v, mask, **attrs)
    if q.dtype == ir.DataType.DOUBLE:  # the op's lse is float64 for float64 inputs; the function's float32
        lse = op.Cast(lse, to=ir.DataType.DOUBLE)
    return out, lse


TABLE = {
    torch.ops.mka.session_scan.default: session_scan,
    torch.ops.mka.chunk_update.default: chunk_update,
    torch.ops.mka.recall_select.default: recall_select,
    torch.ops.mka.route_mix.default: route_mix,
    torch.ops.mka.mka_attention.default: mka_attention,
    torch.ops.mka.flash_attention.default: flash_attention,
}
