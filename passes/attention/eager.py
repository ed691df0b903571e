"""Rule family ``attention.eager.<product>``: attention spelled out as ops.

``out = softmax(transforms(product(q, k))) @ v``, where the product axis is ``matmul`` (also bmm, mm and
``@``), ``einsum`` or ``baddbmm`` (scale as ``alpha``, an additive bias as its input). Between the product
and the softmax lie any number of named, optional **score transforms**, read in one walk and recorded in
``match.facts["transforms"]`` (innermost first):

- ``scale``: multiply / divide by a constant (a number or a one-element tensor without graph inputs);
  scales on q or k are folded by the provenance walk;
- ``softcap``: ``tanh(s / cap) * cap`` (the inner and outer constants are also scales: they cancel);
- ``add``: an additive mask or bias (which one is decided from its values: ``sites``);
- ``fill``: ``masked_fill(s, hide, value)``;
- ``where``: ``where(keep, s, fill)`` or ``where(hide, fill, s)``;
- ``sinks``: ``cat([s, sink_logits], key axis)`` (the softmax's sink column is dropped before ``@ v``);
- ``clamp``: a clamp / maximum of the scores (a finite mask value);
- ``shift``: ``s - max(s)`` or ``s + c`` (softmax-invariant).

Casts (softmax upcasts), copies and dropout are seen through by the matcher. The classic single-layer forms
keep their captures (``scale_op``, ``mask_add``, ``mask_fill``, ``mask_where``) for the backend lowering; a site
with any other transform is marked ``facts["not_lowered"]`` and keeps its own code there.
"""

from __future__ import annotations

from torch import fx

from mka_compile.graph import ops
from mka_compile.graph.pattern import Match, Pat, any_, match, op, opt
from mka_compile.graph.rules import Rule

from .common import (
    einsum_output,
    einsum_scores,
    keys_are_projection,
    query_is_projection,
    scalar_operand,
    softmax_over_keys,
    values_same_sequence,
)
from .rope_forms import _const_like

FILTERS = (softmax_over_keys, query_is_projection, keys_are_projection, values_same_sequence)

PRODUCTS: dict[str, Pat] = {
    # axis: how the scores are produced (the output product may be matmul or einsum in every case)
    "matmul": op("matmul", any_("q"), any_("kt"), name="scores"),
    "einsum": op("einsum", any_("q"), any_("kt"), name="scores", check=einsum_scores),
    "baddbmm": op("baddbmm", any_("bias"), any_("q"), any_("kt"), name="scores"),
}
_LAYER_KINDS = frozenset({"mul", "div", "add", "sub", "masked_fill", "where", "tanh", "cat", "clamp"})
_PRODUCT_KINDS = frozenset({"matmul", "einsum", "baddbmm"})
_VIEWS = frozenset({"view", "unsqueeze", "squeeze"})  # reshapes of the scores (``[B*H, T, T]`` <-> ``[B, H, T, T]``)


def _on_path(n: fx.Node, gm, limit: int = 24) -> bool:
    """Does ``n`` reach a score product back through score layers (is it the scores, not a mask)?"""
    return ops.reaches_back(n, gm, lambda _, k: k in _PRODUCT_KINDS, _LAYER_KINDS | _VIEWS, limit)


def _layer(n: fx.Node, m: Match) -> tuple[str, fx.Node, fx.Node | None, fx.Node] | str:
    """One score layer at ``n``: ``(transform, node, operand, next)`` (next = the scores it reads) or a reason."""
    gm = m.gm
    k = ops.kind(n, gm)
    ins = ops.tensor_inputs(n)
    if k in ("mul", "div"):
        if len(ins) == 1:
            return "scale", n, None, ins[0]
        if len(ins) == 2:
            path = [i for i in ins if _on_path(i, gm)]
            if len(path) == 1 and (k == "mul" or ins[0] is path[0]):
                other = ins[1] if ins[0] is path[0] else ins[0]
                if scalar_operand(n, m) is None:
                    return "scale", n, other, path[0]
                if _const_like(other, gm) or not _on_path(other, gm):
                    return "scale_tensor", n, other, path[0]
        return f"{n.name} multiplies the scores by a tensor, not a constant scale"
    if k == "tanh":
        return "softcap", n, None, ins[0]
    if k == "clamp":
        return "clamp", n, None, ins[0]
    if k in ("add", "sub"):
        if len(ins) == 1:
            return ("shift", n, None, ins[0]) if ins[0] is n.args[0] else f"{n.name} subtracts the scores"
        path = [i for i in ins if _on_path(i, gm)]
        if len(path) != 1:
            return f"{n.name} {'adds' if k == 'add' else 'subtracts'} two score tensors"
        other = ins[1] if ins[0] is path[0] else ins[0]
        if k == "sub":
            src = ops.skip_transparent(other, gm)
            while ops.kind(src, gm) in {"getitem", "view", "expand", "unsqueeze"} | ops.TRANSPARENT:
                src = src.args[0]
            if ins[0] is path[0] and ops.kind(src, gm) == "max":
                return "shift", n, None, path[0]  # s - max(s): softmax-invariant
            return f"{n.name} subtracts a tensor from the scores"
        return "add", n, other, path[0]
    if k == "masked_fill":
        if len(ins) >= 2 and ins[0] is n.args[0]:
            return "fill", n, ins[1], ins[0]
        return f"masked_fill at {n.name} has no tensor mask"
    if k == "where":
        a, b = (n.args[1], n.args[2]) if len(n.args) > 2 else (None, None)
        if isinstance(a, fx.Node) and _on_path(a, gm) and not (isinstance(b, fx.Node) and _on_path(b, gm)):
            return "where", n, n.args[0], a  # where(keep, s, fill)
        if isinstance(b, fx.Node) and _on_path(b, gm):
            return "where_inv", n, n.args[0], b  # where(hide, fill, s)
        return f"where at {n.name} does not select between the scores and a fill value"
    if k == "cat":
        parts = list(n.args[0]) if isinstance(n.args[0], (list, tuple)) else ins
        nd = ops.rank(n)
        dim = ops.arg(n, 1, "dim", 0)
        path = [t for t in parts if isinstance(t, fx.Node) and _on_path(t, gm)]
        if nd is not None and isinstance(dim, int) and ops.normalize_dim(dim, nd) == nd - 1 and len(path) == 1:
            others = [t for t in parts if t is not path[0]]
            return "sinks", n, others[0] if others else None, path[0]
        return f"{n.name} concatenates scores"
    return f"expected a score layer (scale, mask, soft-cap, sinks) but found {k} ({n.name})"


def score_layers(product: Pat):
    """A capture check that walks the score transforms back from the softmax input to ``product``."""

    def check(node: fx.Node, m: Match) -> str | None:
        gm = m.gm
        n, layers = node, []
        for _ in range(40):
            n = ops.skip_transparent(n, gm)
            if not isinstance(n, fx.Node):
                return f"expected the scores, found the constant {n!r}"
            k = ops.kind(n, gm)
            if k in product.kinds:
                if not match(product, n, m):
                    return m.reason
                _record(layers, m)
                return None
            if k in _VIEWS:
                n = n.args[0]
                continue
            if k not in _LAYER_KINDS:
                return f"expected {'/'.join(sorted(product.kinds))} but found {k} ({n.name})"
            step = _layer(n, m)
            if isinstance(step, str):
                return step
            layers.append(step)
            n = step[3]
        return "more than 40 layers between the scores and the softmax"

    return check


def _record(layers: list[tuple[str, fx.Node, fx.Node | None, fx.Node]], m: Match) -> None:
    """Keep the layers (innermost first) and the classic captures of a single scale / mask layer each."""
    inner = layers[::-1]
    m.facts["transforms"] = [(name, node, operand) for name, node, operand, _ in inner]
    names = [t[0] for t in inner]
    classic = {"scale": "scale_op", "add": "mask_add", "fill": "mask_fill", "where": "mask_where"}
    for name, node, operand, _ in inner:
        if name in classic and names.count(name) == 1:
            cap = classic[name]
            if name == "scale":
                m.captures[cap] = node
            else:
                m.captures[cap], m.captures[f"{cap}_op"] = operand, node
    simple = all(names.count(x) <= 1 for x in classic) and set(names) <= set(classic)
    scale_first = names[: names.count("scale")] == ["scale"] * names.count("scale")
    if not (simple and scale_first):
        m.facts["not_lowered"] = f"the scores have transforms the lowering does not rewrite ({', '.join(names)}): kept"


def _sink_drop(node: fx.Node, m: Match) -> str | None:
    """The probabilities' sink column is dropped: a slice of the last axis."""
    return None if ops.kind(node, m.gm) == "slice" else f"{node.name} is not a slice"


def sinks_dropped(m: Match) -> str | None:
    """A slice between the softmax and ``@ v`` is only the sink column being dropped."""
    has_sinks = any(t[0] == "sinks" for t in m.facts.get("transforms", ()))
    if "sink_drop" in m.captures and not has_sinks:
        return f"the probabilities are sliced at {m.captures['sink_drop'].name} (no sink logits were concatenated)"
    if has_sinks and "sink_drop" not in m.captures:
        return "sink logits are concatenated to the scores but their probabilities are not dropped before @ v"
    return None


def make_rule(product: str) -> Rule:
    probs = op("softmax", any_("pre_softmax", check=score_layers(PRODUCTS[product])), name="softmax")
    probs = opt("slice", probs, name="sink_drop")  # attention sinks: softmax over [scores, sinks], sinks dropped
    probs = opt("masked_fill", probs, any_(), name="probs_fill")  # masked probabilities zeroed (CPM-Ant)
    probs = opt("view", probs, name="probs_view")  # [B, H, T, T] -> [B*H, T, T] for a bmm (BLOOM)
    out = op({"matmul", "einsum"}, probs, any_("v"), name="out", check=einsum_output)
    return Rule(f"attention.eager.{product}", out, (sinks_dropped, *FILTERS))


RULES = tuple(make_rule(p) for p in PRODUCTS)
