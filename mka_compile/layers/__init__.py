"""MKA attention layers for building models from scratch, and the cache that carries their state."""

from __future__ import annotations

from .attention import FastMKAAttention, MKAAttention, Router, attend, routing_weights
from .cache import MKACache, MKALayerState
from .rope import RotaryEmbedding

__all__ = [
    "FastMKAAttention",
    "MKAAttention",
    "MKACache",
    "MKALayerState",
    "RotaryEmbedding",
    "Router",
    "attend",
    "routing_weights",
]
