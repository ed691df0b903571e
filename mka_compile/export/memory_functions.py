"""Function bodies (standard ONNX ops) of the memory ops: ``SessionScan``, ``ChunkUpdate``, ``RecallSelect``,
``RouteMix``. Each follows the op's ``reference_*`` in :mod:`mka_compile.kernels` (see those docstrings for the
math); shapes are noted per line as in the references."""

from __future__ import annotations

import numpy as np
import onnx

from .builder import Builder, graph, spec_function

INT64 = onnx.TensorProto.INT64


def _real_positions(b: Builder, valid: str, n_seen: str) -> str:
    """``pos: [B, T]`` = ``max(n_seen + cumsum(valid) - 1, 0)`` (:func:`kernels.real_positions`)."""
    counts = b.op("CumSum", b.op("Cast", valid, to=INT64), b.const(1))  # (B, T)
    pos = b.op("Sub", b.op("Add", b.unsqueeze(n_seen, [1]), counts), b.const(1))
    return b.op("Max", pos, b.const(0))


def session_scan() -> onnx.FunctionProto:
    """The EMA as an ONNX ``Scan`` over T carrying ``(state_k, state_v)``: exact for any T (no ``beta**-t``)."""
    b = Builder()
    beta = b.cast_like(b.attr("beta", "float"), "state_k")
    one, zero = b.scalar_like(1.0, "state_k"), b.scalar_like(0.0, "state_k")
    first_seen = b.op("Equal", b.unsqueeze("n_seen", [1]), b.const(0))  # (B, 1)
    counts = b.op("CumSum", b.op("Cast", "valid", to=INT64), b.const(1))  # (B, T)
    first = b.op("And", "valid", b.op("And", first_seen, b.op("Equal", counts, b.const(1))))
    a = b.where(first, zero, b.where("valid", beta, one))  # (B, T) decay per token
    u = b.op("Sub", one, a)
    ks, vs = b.cast_like("k", "state_k"), b.cast_like("v", "state_v")  # (B, Hkv, T, d) in the state dtype

    body = Builder("scan_")
    a3 = body.unsqueeze("a_t", [1, 2])  # (B, 1, 1)
    u3 = body.unsqueeze("u_t", [1, 2])
    sk = body.op("Add", body.op("Mul", a3, "sk_prev"), body.op("Mul", u3, "k_t"))  # (B, Hkv, d)
    sv = body.op("Add", body.op("Mul", a3, "sv_prev"), body.op("Mul", u3, "v_t"))
    sk_out, sv_out = body.op("Identity", sk), body.op("Identity", sv)
    step = graph(body, "ema_step", ["sk_prev", "sv_prev", "a_t", "u_t", "k_t", "v_t"], [sk, sv, sk_out, sv_out])

    b.nodes.append(
        onnx.helper.make_node(
            "Scan",
            ["state_k", "state_v", a, u, ks, vs],
            ["new_state_k", "new_state_v", "seq_k", "seq_v"],
            body=step,
            num_scan_inputs=4,
            scan_input_axes=[1, 1, 2, 2],
            scan_output_axes=[2, 2],
        )
    )
    b.nodes.append(onnx.helper.make_node("CastLike", ["seq_k", "k"], ["s_k"]))
    b.nodes.append(onnx.helper.make_node("CastLike", ["seq_v", "v"], ["s_v"]))
    return spec_function(b, "SessionScan")


def chunk_update() -> onnx.FunctionProto:
    """Slot sums as a one-hot matmul over the N + 2 slots (the reference's ``scatter_add``: slot N + 1
    takes the padding), then the carried partial sum, fresh summaries and the new partial sum."""
    b = Builder()
    C = b.op("Cast", b.attr("chunk_size", "int"), to=INT64)
    x = b.op("Concat", b.cast_like("k", "part_k"), b.cast_like("v", "part_k"), axis=-1)  # (B, Hkv, T, 2d)
    N = b.dim("summ_k", 2)  # (1,)
    n2 = b.op("Add", N, b.const([2]))
    pos = _real_positions(b, "valid", "n_seen")  # (B, T)
    dump = b.op("Add", N, b.const([1]))
    slot = b.where("valid", b.op("Div", pos, C), dump)  # (B, T); pads -> dump slot
    slots2 = b.range_(n2)  # (N + 2,)
    onehot = b.cast_like(b.op("Equal", b.unsqueeze(slot, [2]), slots2), x)  # (B, T, N + 2)
    onehot = b.unsqueeze(b.op("Transpose", onehot, perm=[0, 2, 1]), [1])  # (B, 1, N + 2, T)
    sums = b.op("MatMul", onehot, x)  # (B, Hkv, N + 2, 2d)
    first = b.op("Div", "n_seen", C)  # (B,) chunk that holds the carried partial sum
    at_first = b.cast_like(b.op("Equal", b.unsqueeze(first, [1]), slots2), x)  # (B, N + 2)
    part = b.unsqueeze(b.op("Concat", "part_k", "part_v", axis=-1), [2])  # (B, Hkv, 1, 2d)
    sums = b.op("Add", sums, b.op("Mul", b.unsqueeze(at_first, [1, 3]), part))
    n_new = b.op("Add", "n_seen", b.op("ReduceSum", b.op("Cast", "valid", to=INT64), b.const([1]), keepdims=0))
    done = b.op("Div", n_new, C)  # (B,) completed chunks after this call
    slots = b.unsqueeze(b.range_(N), [0])  # (1, N)
    fresh = b.op(
        "And",
        b.op("GreaterOrEqual", slots, b.unsqueeze(first, [1])),
        b.op("Less", slots, b.unsqueeze(done, [1])),
    )  # (B, N)
    sums_n = b.op("Slice", sums, b.const([0]), N, b.const([2]))  # (B, Hkv, N, 2d)
    means = b.op("Div", sums_n, b.cast_like(C, x))
    old = b.op("Concat", "summ_k", "summ_v", axis=-1)
    summ = b.where(b.unsqueeze(fresh, [1, 3]), means, old)  # (B, Hkv, N, 2d)
    at_done = b.cast_like(b.op("Equal", b.unsqueeze(done, [1]), slots2), x)  # (B, N + 2)
    new_part = b.op("ReduceSum", b.op("Mul", b.unsqueeze(at_done, [1, 3]), sums), b.const([2]), keepdims=0)
    b.nodes.append(onnx.helper.make_node("Split", [new_part], ["new_part_k", "new_part_v"], axis=-1, num_outputs=2))
    b.nodes.append(onnx.helper.make_node("Split", [summ], ["new_summ_k", "new_summ_v"], axis=-1, num_outputs=2))
    return spec_function(b, "ChunkUpdate")


def recall_select() -> onnx.FunctionProto:
    """Scores of the completed chunks, unavailable ones at -inf, ``TopK`` (ties: lower index first), padded to
    R when fewer than R slots exist."""
    b = Builder()
    C = b.op("Cast", b.attr("chunk_size", "int"), to=INT64)
    R = b.unsqueeze(b.op("Cast", b.attr("top_r", "int"), to=INT64), [0])  # (1,)
    keys_t = b.op("Transpose", "summ_k", perm=[0, 1, 3, 2])  # (B, Hkv, d, N)
    scores = b.op("MatMul", b.cast_like("q_r", "summ_k"), keys_t)  # (B, Hkv, T, N)
    N = b.dim("summ_k", 2)
    avail = b.op("Less", b.unsqueeze(b.range_(N), [0, 1]), b.unsqueeze(b.op("Div", "pos", C), [2]))  # (B, T, N)
    neg_inf = b.scalar_like(-np.inf, scores)
    masked = b.where(b.unsqueeze(avail, [1]), scores, neg_inf)  # (B, Hkv, T, N)
    take = b.op("Min", R, N)
    vals, top = b.op("TopK", masked, take, axis=-1, largest=1, sorted=1, outputs=2)
    ok = b.op("Greater", vals, neg_inf)  # (B, Hkv, T, take)
    idx = b.where(ok, top, b.const(0))
    missing = b.op("Sub", R, take)
    pads = b.cat_shape(0, 0, 0, 0, 0, 0, 0, missing)
    b.nodes.append(onnx.helper.make_node("Pad", [idx, pads, b.const(0)], ["idx"]))
    found = b.op("Pad", b.op("Cast", ok, to=onnx.TensorProto.INT32), pads, b.const(0, np.int32))
    b.nodes.append(onnx.helper.make_node("Cast", [found], ["found"], to=onnx.TensorProto.BOOL))
    return spec_function(b, "RecallSelect")


def route_mix() -> onnx.FunctionProto:
    """``kf = sum_l lam_l ks[l]`` accumulated in the routing dtype, cast back to the level dtype."""
    b = Builder()
    w = b.unsqueeze(b.op("Transpose", "lam", perm=[3, 0, 1, 2]), [4])  # (L, B, G, T, 1)
    kf = b.op("ReduceSum", b.op("Mul", w, b.cast_like("ks", "lam")), b.const([0]), keepdims=0)  # (B, Hkv, T, d)
    vf = b.op("ReduceSum", b.op("Mul", w, b.cast_like("vs", "lam")), b.const([0]), keepdims=0)
    b.nodes.append(onnx.helper.make_node("CastLike", [kf, "ks"], ["kf"]))
    b.nodes.append(onnx.helper.make_node("CastLike", [vf, "vs"], ["vf"]))
    return spec_function(b, "RouteMix")


FUNCTIONS = {
    "SessionScan": session_scan,
    "ChunkUpdate": chunk_update,
    "RecallSelect": recall_select,
    "RouteMix": route_mix,
}
