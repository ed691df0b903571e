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

import torch

from mka_compile import kernels as K


def session_both_ways(k1: torch.Tensor, v1: torch.Tensor, beta: float, valid: torch.Tensor):
    """``k1, v1: [B, Hkv, T, d]``, ``valid: [B, T]`` -> the bidirectional session keys and values (state dtype)."""
    fk, fv, _, _ = K.session_scan(k1, v1, beta, valid)
    bk, bv, _, _ = K.session_scan(k1.flip(2), v1.flip(2), beta, valid.flip(1))
    return (fk + bk.flip(2)) / 2, (fv + bv.flip(2)) / 2


def whole_sequence_positions(valid: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` positions for ``mka::recall_select`` that make every complete chunk of the row recallable."""
    return valid.long().sum(-1, keepdim=True).expand_as(valid).contiguous()
