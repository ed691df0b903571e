"""Rules ``attention.sdpa`` (``scaled_dot_product_attention`` with any arguments) and ``attention.mka``
(a site already converted to MKA: ``mka::mka_attention``).

Mask, ``is_causal``, ``scale``, ``enable_gqa`` and dropout are read from the call; q, k and v are
traced back to their projections like the eager forms.
"""

from __future__ import annotations

from mka_compile.graph.pattern import any_, op
from mka_compile.graph.rules import Rule

from .common import keys_are_projection, query_is_projection, values_same_sequence

RULE = Rule(
    "attention.sdpa",
    op("sdpa", any_("q"), any_("k"), any_("v"), name="out"),
    (query_is_projection, keys_are_projection, values_same_sequence),
)


def _mka_operands(m) -> str | None:
    """``mka::mka_attention(q, ks, vs, ...)``: the site's own keys/values are the first level."""
    node = m.captures["out"]
    m.captures["k"], m.captures["v"] = node.args[1][0], node.args[2][0]
    return None


MKA_RULE = Rule(
    "attention.mka",
    op("mka_attention", any_("q"), name="out"),
    (_mka_operands, query_is_projection, keys_are_projection, values_same_sequence),
)
RULES = (RULE, MKA_RULE)
