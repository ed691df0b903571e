"""Function bodies (standard ONNX ops) of MKA's multi-level attention: ``MKAAttention`` (L1/L2 levels) and
``MKAAttentionRecall`` (plus the L3 recalled entries), following :func:`kernels.reference_mka_attention`.

Scores are computed for all full-length levels at once (levels stacked on a leading axis), masked with the
causal, bottom-right aligned visibility of the padded keys, soft-maxed, and mixed by the routing weights.
"""

from __future__ import annotations

import numpy as np
import onnx

from .builder import Builder, spec_function


def _causal(b: Builder, tq: str, tk: str) -> str:
    """``[Tq, Tk]`` bool: key j is visible to query i when ``j <= i + Tk - Tq`` or the ``causal`` attribute is 0."""
    i = b.op("Add", b.unsqueeze(b.range_(tq), [1]), b.op("Sub", tk, tq))  # (Tq, 1)
    j = b.unsqueeze(b.range_(tk), [0])  # (1, Tk)
    causal = b.op("Cast", b.attr("causal", "int"), to=onnx.TensorProto.BOOL)
    return b.op("Or", b.op("LessOrEqual", j, i), b.op("Not", causal))


def _visibility(b: Builder, kv_valid: str, tq: str, tk: str) -> str:
    """``[B, Tq, Tk]`` bool (:func:`kernels.visibility`)."""
    return b.op("And", b.unsqueeze(kv_valid, [1]), _causal(b, tq, tk))  # (B, Tq, Tk)


def _masked_softmax_attention(b: Builder, q: str, k: str, v: str, allowed: str, scale: str) -> str:
    """``softmax(scale q k^T, hidden where not allowed) v`` with broadcasting over the leading axes."""
    s = b.op("Mul", b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 2, 3, 5, 4])), scale)
    s = b.where(allowed, s, b.scalar_like(-np.inf, s))
    return b.op("MatMul", b.op("Softmax", s, axis=-1), v)


def _mka_attention(recall: bool) -> onnx.FunctionProto:
    b = Builder()
    acc = "lam"  # accumulation dtype: float32 (float64 for float64 inputs), like the routing weights
    B, H, Tq, d = (b.dim("q", a) for a in range(4))
    Hkv, Tk = b.dim("ks", 2), b.dim("ks", 3)
    rep = b.op("Div", H, Hkv)
    scale = b.cast_like(b.attr("scale", "float"), acc)
    vis = _visibility(b, "kv_valid", Tq, Tk)  # (B, Tq, Tk)
    empty = b.op("Not", b.any_(vis, -1))  # (B, Tq, 1)
    allowed = b.reshape(b.op("Or", vis, empty), b.cat_shape(1, B, 1, 1, Tq, Tk))  # (1, B, 1, 1, Tq, Tk)
    grouped = b.cat_shape(1, B, Hkv, rep, Tq, d)
    qg = b.reshape(b.cast_like("q", acc), grouped)  # (1, B, Hkv, rep, Tq, d)
    kk = b.unsqueeze(b.cast_like("ks", acc), [3])  # (Lf, B, Hkv, 1, Tk, d)
    vv = b.unsqueeze(b.cast_like("vs", acc), [3])
    o = _masked_softmax_attention(b, qg, kk, vv, allowed, scale)  # (Lf, B, Hkv, rep, Tq, d)
    nf = b.dim("ks", 0)
    G = b.dim("lam", 1)
    w = b.op("Transpose", "lam", perm=[3, 0, 1, 2])  # (L, B, G, Tq)
    w_full = b.op("Slice", w, b.const([0]), nf, b.const([0]))  # (Lf, B, G, Tq)
    w_full = b.reshape(w_full, b.cat_shape(nf, B, G, 1, Tq, 1))
    out = b.op("ReduceSum", b.op("Mul", w_full, o), b.const([0]), keepdims=0)  # (B, Hkv, rep, Tq, d)
    empty5 = b.reshape(empty, b.cat_shape(B, 1, 1, Tq, 1))
    out = b.where(empty5, b.scalar_like(0.0, out), out)
    if recall:
        S = b.dim("mem_k", 2)
        hits = b.op("Equal", b.unsqueeze("idx3", [4]), b.range_(S))  # (B, Hkv, Tq, R, S)
        hits = b.op("And", hits, b.unsqueeze("found3", [4]))
        sel = b.op("Squeeze", b.any_(hits, 3), b.const([3]))  # (B, Hkv, Tq, S)
        q3 = b.reshape(b.cast_like("q3", acc), b.cat_shape(B, Hkv, rep, Tq, d))  # (B, Hkv, rep, Tq, d)
        mk = b.unsqueeze(b.cast_like("mem_k", acc), [2])  # (B, Hkv, 1, S, d)
        mv = b.unsqueeze(b.cast_like("mem_v", acc), [2])
        s = b.op("Mul", b.op("MatMul", q3, b.op("Transpose", mk, perm=[0, 1, 2, 4, 3])), scale)  # (B,Hkv,rep,Tq,S)
        m = b.unsqueeze(sel, [2])  # (B, Hkv, 1, Tq, S)
        any_hit = b.any_(m, -1)
        s = b.where(m, s, b.scalar_like(-np.inf, s))
        s = b.where(any_hit, s, b.scalar_like(0.0, s))  # rows that recalled nothing: no NaN, zeroed below
        p = b.where(m, b.op("Softmax", s, axis=-1), b.scalar_like(0.0, s))
        w3 = b.op("Slice", w, nf, b.op("Add", nf, b.const([1])), b.const([0]))  # (1, B, G, Tq)
        w3 = b.reshape(w3, b.cat_shape(B, G, 1, Tq, 1))
        out = b.op("Add", out, b.op("Mul", w3, b.op("MatMul", p, mv)))
    out = b.reshape(out, b.cat_shape(B, H, Tq, d))
    b.nodes.append(onnx.helper.make_node("CastLike", [out, "q"], ["out"]))
    return spec_function(b, "MKAAttentionRecall" if recall else "MKAAttention")


def _flash_attention(masked: bool) -> onnx.FunctionProto:
    """:func:`kernels.reference_flash_attention` in float32: K/V repeated over the query heads of each kv head,
    mask values <= -1e4 hide the key, the row max of a row that sees nothing is 0 (so its sum is 0)."""
    b = Builder()
    f32 = onnx.TensorProto.FLOAT
    q, k, v = (b.op("Cast", x, to=f32) for x in ("q", "k", "v"))
    B, H, Tq, d = (b.dim("q", a) for a in range(4))
    Hkv, Tk = b.dim("k", 1), b.dim("k", 2)
    rep = b.op("Div", H, Hkv)

    def heads(x: str) -> str:  # (B, Hkv, Tk, d) -> (B, H, Tk, d)
        x = b.op("Expand", b.unsqueeze(x, [2]), b.cat_shape(B, Hkv, rep, Tk, d))
        return b.reshape(x, b.cat_shape(B, H, Tk, d))

    neg_inf = b.const(-np.inf, np.float32)
    s = b.op("MatMul", q, b.op("Transpose", heads(k), perm=[0, 1, 3, 2]))  # (B, H, Tq, Tk)
    s = b.op("Mul", s, b.attr("scale", "float"))
    if masked:
        m = b.op("Cast", "mask", to=f32)  # (B|1, H|1, Tq, Tk)
        hidden = b.op("LessOrEqual", m, b.const(-1.0e4, np.float32))
        s = b.op("Add", s, b.where(hidden, neg_inf, m))
    s = b.where(_causal(b, Tq, Tk), s, neg_inf)  # (B, H, Tq, Tk)
    mx = b.op("ReduceMax", s, b.const([-1]), keepdims=1)
    mx = b.where(b.op("Equal", mx, neg_inf), b.const(0.0, np.float32), mx)
    p = b.op("Exp", b.op("Sub", s, mx))
    denom = b.op("ReduceSum", p, b.const([-1]), keepdims=1)
    seen = b.op("Greater", denom, b.const(0.0, np.float32))
    safe = b.where(seen, denom, b.const(1.0, np.float32))
    out = b.op("Div", b.op("MatMul", p, heads(v)), safe)  # (B, H, Tq, d)
    b.nodes.append(onnx.helper.make_node("CastLike", [out, "q"], ["out"]))
    lse = b.where(seen, b.op("Add", mx, b.op("Log", safe)), neg_inf)
    b.nodes.append(onnx.helper.make_node("Squeeze", [lse, b.const([-1])], ["lse"]))
    return spec_function(b, "FlashAttentionMasked" if masked else "FlashAttention")


FUNCTIONS = {
    "MKAAttention": lambda: _mka_attention(False),
    "MKAAttentionRecall": lambda: _mka_attention(True),
    "FlashAttention": lambda: _flash_attention(False),
    "FlashAttentionMasked": lambda: _flash_attention(True),
}
