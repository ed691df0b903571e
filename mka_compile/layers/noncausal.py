"""MKA memory for bidirectional self-attention (``MKAConfig(causal=False)``; the paper defines only the causal case).

A bidirectional site (an encoder: BERT, ViT, BART's encoder) sees its whole sequence at once and keeps no cache, so
its memory levels are defined over the whole sequence, symmetrically:

- L2 session: ``s_t = (ema_fwd_t + ema_bwd_t) / 2``, the average of the causal EMA from the start and the same EMA
  run from the end (padding skipped in both), so every token's summary weighs its neighbours on both sides by
  ``beta ** distance``;
- L3 long-term: the sequence's complete chunks are summarized as in the causal case, and every token may recall
  any of them (the chunk it sits in and later ones included).

Everything else (router, gate, the routed mix, MKA attention per level) is the causal definition with the attention
itself non-causal.
"""

from __future__ import annotations

from mka_compile.memory import session_both_ways, whole_sequence_positions

__all__ = ["session_both_ways", "whole_sequence_positions"]
