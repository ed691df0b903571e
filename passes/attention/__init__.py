"""Attention rules: ``attention.sdpa`` and ``attention.eager.<product>``, plus site facts."""

from __future__ import annotations

from . import eager, sdpa
from .sites import SiteFacts, explain_softmax, find_sites

RULES = (*sdpa.RULES, *eager.RULES)

__all__ = ["RULES", "SiteFacts", "explain_softmax", "find_sites"]
