"""MKA mode with bounded memory: one store per full-length level and the routed mix of the levels' bounded
attentions (:mod:`mka_compile.bounded` answers each level)."""

from __future__ import annotations

import torch

from mka_compile import kernels as K
from mka_compile.bounded import attend
from mka_compile.bounded_store import BoundedStore
from mka_compile.config import MKAConfig


def level_stores(levels: int, kv_heads: int, head_dim: int, ref: torch.Tensor, cfg: MKAConfig) -> list[BoundedStore]:
    """Fresh stores for ``levels`` full-length levels of a batch of ``ref.shape[0]`` rows: the local level's recalls
    chunks; the others (MKA mode's session level) keep sinks and window only."""
    B = ref.shape[0]
    return [
        BoundedStore.empty(B, kv_heads, head_dim, ref, cfg if i == 0 else cfg.without_recall()) for i in range(levels)
    ]


def attend_levels(
    stores: list[BoundedStore],
    q: torch.Tensor,
    ks: list[torch.Tensor],
    vs: list[torch.Tensor],
    valid: torch.Tensor,
    lam: torch.Tensor,
    q_r: torch.Tensor | None,
    summ_k: torch.Tensor | None,
    l3: tuple[torch.Tensor, ...] | None,
    cfg: MKAConfig,
    freqs: torch.Tensor | None,
    interleaved: bool,
    trained_length: int,
    scale: float,
    **recall_from,
) -> torch.Tensor:
    """MKA mode with bounded memory: ``sum_l lam_l Attn_l(q)``, each level over a bounded set.

    - local (``ks[0], vs[0]`` into ``stores[0]``): the sinks, the window and the recalled chunks, as :func:`attend`;
    - session (``ks[1], vs[1]``, the EMA keys rotated at their positions, into ``stores[1]``): its sinks and window
      (no recall: the level is a running summary already);
    - long-term (``l3 = (q3, mem_k, mem_v, idx, found)``): the R chunk summaries each query recalled, as unbounded
      MKA mode attends to them.

    ``lam: [B, G, T, L]`` the routing weights; ``recall_from``: the local level's memory bank (:func:`attend`).
    With a window longer than the sequence this is unbounded MKA mode."""
    B, H, T, d = q.shape
    Hkv = ks[0].shape[1]
    outs = [
        attend(
            stores[0],
            q,
            ks[0],
            vs[0],
            valid,
            q_r,
            summ_k,
            cfg,
            freqs,
            interleaved,
            trained_length,
            scale,
            **recall_from,
        )
    ]
    if len(ks) > 1:
        plain = cfg.without_recall()
        outs.append(
            attend(stores[1], q, ks[1], vs[1], valid, None, None, plain, freqs, interleaved, trained_length, scale)
        )  # noqa: E501
    if l3 is not None:
        q3, mem_k, mem_v, idx, found = l3
        acc = mem_k.dtype
        sel = torch.where(found, idx, -1)
        o3, _ = K.bounded_attention(q3.to(acc), mem_k, mem_v.to(acc), sel, torch.zeros_like(sel), None, scale, False)
        outs.append(o3)
    w = lam.view(B, lam.shape[1], 1, T, lam.shape[-1])  # (B, G, 1, T, L): broadcasts over a group's query heads
    out = torch.zeros(B, Hkv, H // Hkv, T, d, dtype=w.dtype, device=q.device)
    for i, o in enumerate(outs):
        out = out + w[..., i, None] * o.view(B, Hkv, H // Hkv, T, d).to(w.dtype)
    return out.reshape(B, H, T, d).to(q.dtype)
