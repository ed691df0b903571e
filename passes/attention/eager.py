"""Rule family ``attention.eager.<product>``: attention spelled out as ops.

``out = softmax(mask(scale(product(q, k)))) @ v``, where the product axis is ``matmul`` (also bmm, mm
and ``@``), ``einsum`` or ``baddbmm`` (scale as ``alpha``), the optional scale multiplies or divides by
a constant (scales on q or k are folded by the provenance walk), and the optional mask layers are an
additive mask, ``masked_fill`` or ``where``. Casts (softmax upcasts), copies and dropout are seen
through by the matcher.
"""

from __future__ import annotations

from mka_compile.graph.pattern import Pat, any_, op, opt
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

FILTERS = (softmax_over_keys, query_is_projection, keys_are_projection, values_same_sequence)


def masked_scores(product: Pat) -> Pat:
    """Optional layers between the product and the softmax, outermost first."""
    s = opt({"mul", "div"}, product, name="scale_op", check=scalar_operand)
    s = opt("add", s, any_("mask_add"), name="mask_add_op", commutative=True)
    s = opt("masked_fill", s, any_("mask_fill"), name="mask_fill_op")
    s = opt("where", any_("mask_where"), s, through=1, name="mask_where_op")
    return s


PRODUCTS: dict[str, Pat] = {
    # axis: how the scores are produced (the output product may be matmul or einsum in every case)
    "matmul": op("matmul", any_("q"), any_("kt"), name="scores"),
    "einsum": op("einsum", any_("q"), any_("kt"), name="scores", check=einsum_scores),
    "baddbmm": op("baddbmm", any_("bias"), any_("q"), any_("kt"), name="scores"),
}


def make_rule(product: str) -> Rule:
    probs = op("softmax", masked_scores(PRODUCTS[product]), name="softmax")
    out = op({"matmul", "einsum"}, probs, any_("v"), name="out", check=einsum_output)
    return Rule(f"attention.eager.{product}", out, FILTERS)


RULES = tuple(make_rule(p) for p in PRODUCTS)
