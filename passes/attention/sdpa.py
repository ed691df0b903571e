"""Rule ``attention.sdpa``: ``scaled_dot_product_attention`` with any arguments.

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
RULES = (RULE,)
