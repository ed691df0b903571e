"""Filters and site facts shared by the attention rule families."""

from __future__ import annotations

import re

from torch import fx

from mka_compile.graph import ops
from mka_compile.graph.pattern import Match

from .provenance import Provenance, walk


def provenance(m: Match, role: str) -> Provenance:
    """Walk back from capture ``role`` ('q', 'k' or 'v'; 'kt' for transposed keys), cached on the match."""
    key = f"prov_{role}"
    if key not in m.facts:
        name = "kt" if role == "k" and "kt" in m.captures else role
        m.facts[key] = walk(m.captures[name], m.gm, {"q": "query", "k": "keys", "v": "values"}[role])
    return m.facts[key]


def query_is_projection(m: Match) -> str | None:
    p = provenance(m, "q")
    return None if p.kind == "projection" else p.reason


def keys_are_projection(m: Match) -> str | None:
    p = provenance(m, "k")
    return None if p.kind == "projection" else p.reason


def _roots(src: fx.Node | None, gm, depth: int = 2) -> list[fx.Node]:
    """``src`` and the inputs of the low-rank projections it comes from (``q_b(norm(q_a(x)))``: up to ``x``)."""
    out = []
    while src is not None and len(out) <= depth:
        while ops.kind(src, gm) in ops.TRANSPARENT | ops.LAYOUT and src.args and isinstance(src.args[0], fx.Node):
            src = src.args[0]  # a reshape of the hidden states reads the same sequence
        out.append(src)
        p = walk(src, gm, "values")
        src = p.source if p.kind == "projection" and not p.rope else None
    return out


def same_sequence(a: fx.Node | None, b: fx.Node | None, gm) -> bool:
    """Do two projection inputs read the same hidden states (directly or through low-rank projections with norms,
    as multi-head latent attention does)?"""
    if a is None or b is None:
        return a is b
    return a is b or bool(set(_roots(a, gm)) & set(_roots(b, gm)))


def values_same_sequence(m: Match) -> str | None:
    pv, pk = provenance(m, "v"), provenance(m, "k")
    if pv.kind != "projection":
        return pv.reason
    if not same_sequence(pv.source, pk.source, m.gm):
        return f"the values ({pv.describe}) are not a projection of the same sequence as the keys ({pk.describe})"
    return None


def softmax_over_keys(m: Match) -> str | None:
    """The softmax normalises over the key axis of the scores (the last axis of ``q @ k^T``)."""
    sm = m.captures["softmax"]
    nd = ops.rank(sm)
    dim = ops.arg(sm, 1, "dim", -1)
    if not isinstance(dim, int):
        return f"softmax at {sm.name} has a non-constant dim"
    key_axis = m.facts.get("key_axis")
    want = nd - 1 if key_axis is None and nd is not None else key_axis
    if nd is not None and ops.normalize_dim(dim, nd) != want:
        return f"softmax at {sm.name} normalises axis {dim}, not the key axis of the scores ({want})"
    return None


_EINSUM = re.compile(r"^\s*([a-zA-Z.]+)\s*,\s*([a-zA-Z.]+)\s*->\s*([a-zA-Z.]+)\s*$")


def _einsum_parts(node: fx.Node) -> tuple[str, str, str, str, set[str]] | str:
    """``(equation, a, b, out, contracted letters)`` of a two-operand einsum, or the reason it is not one."""
    eq = node.args[0] if isinstance(node.args[0], str) else None
    parts = _EINSUM.match(eq or "")
    if not parts:
        return f"einsum at {node.name} is not a two-operand contraction ({eq!r})"
    a, b, out = parts.groups()
    return eq, a, b, out, set(a) & set(b) - set(out)


def einsum_scores(node: fx.Node, m: Match) -> str | None:
    """``einsum('...qd,...kd->...qk', q, k)``: contract the head dim, keep the key axis last or not."""
    parts = _einsum_parts(node)
    if isinstance(parts, str):
        return parts
    eq, a, b, out, contracted = parts
    if len(contracted) != 1 or a[-1] not in contracted:
        return f"einsum {eq!r} at {node.name} does not contract the head dimension of q with k"
    key = [c for c in b if c not in a]
    if len(key) != 1:
        return f"einsum {eq!r} at {node.name} has no single key axis"
    m.facts["key_axis"] = out.index(key[0])
    m.facts["key_letter"] = key[0]
    return None


def einsum_output(node: fx.Node, m: Match) -> str | None:
    """``einsum('...qk,...kd->...qd', p, v)``: contract the key axis (no condition on a matmul)."""
    if ops.kind(node, m.gm) != "einsum":
        return None
    parts = _einsum_parts(node)
    if isinstance(parts, str):
        return parts
    eq, _, _, _, contracted = parts
    if len(contracted) != 1:
        return f"einsum {eq!r} at {node.name} does not contract the key axis of the probabilities with v"
    return None


def scalar_operand(node: fx.Node, m: Match) -> str | None:
    """A scale layer multiplies/divides by a constant (a number or a tensor without graph inputs)."""
    ins = ops.tensor_inputs(node)
    if len(ins) == 1:
        return None
    from .rope_forms import _const_like

    if len(ins) == 2 and any(_const_like(i, m.gm) and (ops.shape(i) or ()) in ((), (1,)) for i in ins):
        return None
    return f"{node.name} multiplies the scores by a tensor, not a constant scale"
