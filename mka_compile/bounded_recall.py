"""Recall in bounded memory (:mod:`mka_compile.bounded`): which chunks a query recalls and their exact attention.

- **Chunk keys** (``chunk_keys="bounds"``): when a chunk completes, its keys (turned back by their real positions)
  give a centre (their mean) and, per channel pair (a RoPE pair; a channel outside RoPE alone), a radius (the
  largest distance of one of its keys from the centre). With the query turned back the same way, a chunk's recall
  score ``q . mid + sum_pairs |q_pair| rad_pair`` bounds ``max over its keys of q . k`` (summed over a kv group's
  query heads), as Quest bounds a page by per-channel minima and maxima; a rotation common to a row (positions
  offset from the real ones) changes neither term. ``chunk_keys="mean"`` scores the long-term level's summaries.
- **Recalled entries**: each query's R best chunks among those before its window (``mka::recall_select``), their
  tokens fetched once per call from the host store, as entries (with their RoPE moves) that
  :mod:`mka_compile.bounded` attends exactly with the window and the sinks (``mka::bounded_attention``).
"""

from __future__ import annotations

import torch

from mka_compile.config import MKAConfig
from mka_compile.kernels.bounded_attention import rotate_by


def unrotate(x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor | None, interleaved: bool) -> torch.Tensor:
    """``x: [B, h, L, d]`` rotated at positions ``pos: [B, L]`` -> un-rotated (as it was before RoPE)."""
    if freqs is None or not freqs.numel():
        return x
    return rotate_by(x, -(pos.to(torch.float64)[:, None, :, None] * freqs.to(torch.float64)), interleaved)


def pair_norms(x: torch.Tensor, freqs: torch.Tensor | None, interleaved: bool) -> torch.Tensor:
    """``[..., d] -> [..., P]``: the norm of each RoPE channel pair (``rot = 2 * len(freqs)`` channels, paired as the
    model rotates them), then the absolute value of each channel RoPE leaves alone; ``P = rot/2 + d - rot``."""
    half = 0 if freqs is None else freqs.numel()
    rot = 2 * half
    xr, xp = x[..., :rot], x[..., rot:]
    a, b = (xr[..., 0::2], xr[..., 1::2]) if interleaved else (xr[..., :half], xr[..., half:])
    return torch.cat([torch.sqrt(a * a + b * b), xp.abs()], -1)


def update_bounds(store, freqs: torch.Tensor | None, interleaved: bool) -> None:
    """Compute the bounds of the chunks of ``store`` (a :class:`~mka_compile.bounded_store.BoundedStore`) completed
    since the last call (all still in ``recent``): the keys are turned back by their real positions, the centre is their
    mean, and the radius of each channel pair (a RoPE pair; a single channel outside RoPE) is the largest distance
    of a key's pair from the centre's."""
    C = store.chunk
    done = store.n // C  # (B,) completed chunks
    first = store.bounds_done
    J = int((done - first).max())
    if J <= 0:
        return
    B, G, _, d = store.recent_k.shape
    N = int(done.max())
    have = store.chunk_bounds.shape[2]
    if have < N:
        store.chunk_bounds = torch.nn.functional.pad(store.chunk_bounds, (0, 0, 0, max(N, 2 * have) - have))
    j = torch.arange(J, device=done.device)
    c = first[:, None] + j  # (B, J) chunk ids
    ok = c < done[:, None]
    real = (c[..., None] * C + torch.arange(C, device=done.device)).flatten(1)  # (B, J*C)
    slot = (real - store.base[:, None]).clamp(0, max(store.recent_k.shape[2] - 1, 0))  # completed chunks: recent
    k = torch.gather(store.recent_k, 2, slot[:, None, :, None].expand(B, G, J * C, d)).float()
    k = unrotate(k, real, freqs, interleaved).view(B, G, J, C, d)
    mid = k.mean(3)  # (B, G, J, d)
    rad = pair_norms(k - mid[:, :, :, None], freqs, interleaved).amax(3)  # (B, G, J, P)
    val = torch.cat([mid, rad], -1)  # (B, G, J, d + P): the chunks' recall keys
    bounds = store.chunk_bounds
    if bounds.shape[-1] != val.shape[-1]:  # the width is known once the RoPE frequencies are (first chunks)
        bounds = bounds.new_zeros(*bounds.shape[:3], val.shape[-1])
    N_all = bounds.shape[2]
    tgt = torch.where(ok, c, N_all + j)[:, None, :, None].expand_as(val)  # others: spare slots, dropped
    store.chunk_bounds = torch.cat([bounds, torch.zeros_like(val)], 2).scatter(2, tgt, val)[:, :, :N_all]
    store.bounds_done = torch.maximum(first, done)


def recall_keys(store, q: torch.Tensor, t: torch.Tensor, freqs, interleaved: bool) -> tuple[torch.Tensor, ...]:
    """Recall queries and chunk keys whose product bounds, for each chunk, the sum over a kv group's query
    heads of ``max over the chunk's keys of q . k``: ``sum_h q_h . mid + sum_h sum_pairs |q_h,pair| rad_pair``
    (a key's pair lies within ``rad`` of the centre's). A rotation common to a row's queries and keys (RoPE
    positions offset from the real ones, as in a left-padded forward without ``position_ids``) changes neither
    term. ``q: [B, H, T, d]`` rotated at real positions ``t``. Returns ``(q' [B, G, T, d+P], key' [B, G, N,
    d+P])``."""
    B, H, T, d = q.shape
    G = store.recent_k.shape[1]
    qu = unrotate(q.float(), t, freqs, interleaved).view(B, G, H // G, T, d)
    q_r = torch.cat([qu.sum(2), pair_norms(qu, freqs, interleaved).sum(2)], -1)
    return q_r, store.chunk_bounds


def entries(store, q, ws, real, q_r, summ_k, cfg: MKAConfig, remap, freqs, interleaved: bool, bank=None, offset=None):
    """Each query's R recalled chunks (``mka::recall_select`` among its own chunks before its window and, with a
    ``bank`` (:class:`~mka_compile.bounded_bank.BankLayer`), the bank's chunks) as entries of a pool for
    ``mka::bounded_attention``: ``(pool_k, pool_v [B, G, P, d], idx [B, G, T, R*C], delta [B, G, T, R*C] or None,
    n_rec [B, G, T])``. The pool starts with ``store.recent`` (slot ``j``: real position ``base + j``), then the
    fetched chunks; ``delta`` moves each entry (one move per chunk; None: none moves). A recalled bank chunk is
    placed right before the window, before the query's own recalled chunks; ``offset: [B]`` the row's rotation
    positions minus its real ones (None: 0)."""
    B, H, T, d = q.shape
    G = store.recent_k.shape[1]
    S, C, R = cfg.sink_tokens, cfg.chunk_size, cfg.exact_recall
    dev = q.device
    base = store.base
    N = summ_k.shape[2]
    if bank is not None and summ_k.shape[-1] != bank.bounds.shape[-1]:  # no chunk of its own has bounds yet
        summ_k = summ_k.new_zeros(B, G, N, bank.bounds.shape[-1])
    at = torch.where(real, ws, 0)  # recall among the chunks c < ws(t) / C
    if bank is not None and bank.index is not None:  # the bank's best by its FAISS index, merged with its own
        sel, found = _select_with_index(q_r, summ_k, at, C, R, bank, offset, freqs, interleaved, d)
    else:
        bank_k = None
        if bank is not None:
            bank_k = bank.bounds.to(dev)[None].expand(B, -1, -1, -1)  # (B, G, M, d + P)
            if offset is not None and freqs is not None and freqs.numel():  # centres into the row's frame
                mid = unrotate(bank_k[..., :d], -offset[:, None].expand(B, bank_k.shape[2]), freqs, interleaved)
                bank_k = torch.cat([mid, bank_k[..., d:]], -1)
        sel, found = torch.ops.mka.recall_select(q_r, summ_k, at, C, R, bank_k, None)  # (B, G, T, R)
    is_bank = None if bank is None else found & (sel >= N)  # slots N .. N + M - 1: the bank's chunks
    own = found if bank is None else found & ~is_bank
    stored = base // C  # (B,) chunks in the host store
    in_store = own & (sel < stored[:, None, None, None])
    o = torch.arange(C, device=dev)
    ci = sel[..., None] * C + o  # (B, G, T, R, C) real positions (own chunks)
    ok = own[..., None] & (ci >= S)  # a sink is attended as a sink
    if bank is not None:
        ok = ok | is_bank[..., None]
    slot = ci - base[:, None, None, None, None]  # in recent (the pool starts with recent)
    parts_k, parts_v = [store.recent_k], [store.recent_v]
    pooled = store.recent_k.shape[2]
    for chosen, ids, keys, values in (
        (in_store, sel, store.chunk_k, store.chunk_v),
        *([(is_bank, sel - N, bank.keys[None], bank.values[None])] if bank is not None else []),
    ):
        got = _fetch(chosen, ids, keys, values, dev)
        if got is None:
            continue
        fk, fv, u = got  # (B, G, U*C, d) each; u: each entry's place among the fetched chunks
        parts_k.append(fk.to(store.recent_k.dtype))
        parts_v.append(fv.to(store.recent_v.dtype))
        slot = torch.where(chosen[..., None], pooled + u[..., None] * C + o, slot)
        pooled += fk.shape[2]
    idx = torch.where(ok, slot, -1).flatten(3)  # (B, G, T, R*C)
    n_rec = found.sum(-1)  # (B, G, T)
    delta = None
    if remap is not None or bank is not None:
        delta = _moves(sel, found, is_bank, ws, n_rec, remap, bank, N, offset, C).flatten(3)
    pool_k = torch.cat(parts_k, 2) if len(parts_k) > 1 else parts_k[0]
    pool_v = torch.cat(parts_v, 2) if len(parts_v) > 1 else parts_v[0]
    return pool_k, pool_v, idx, delta, n_rec


FETCH_EACH = 16  # at most this many entries per (row, kv head): fetched one by one (duplicates included)


def _fetch(chosen, ids, keys, values, dev):
    """The chunks ``ids[chosen]`` (``[B, G, T, R]``) of ``keys, values: [B|1, G, N, C, d]`` (host memory), each
    fetched once: ``(k, v [B, G, U*C, d] on dev, u [B, G, T, R] each entry's place among them)``, or None."""
    n = keys.shape[2]
    if n == 0 or not bool(chosen.any()):
        return None
    B, G, T, R = ids.shape
    C, d = keys.shape[3], keys.shape[4]
    if T * R <= FETCH_EACH:  # few entries (a decode step): fetch each, without finding the distinct chunks first
        h = ids.clamp(0, n - 1).flatten(2).to(keys.device)[..., None, None].expand(B, G, T * R, C, d)
        fk = torch.gather(keys.expand(B, -1, -1, -1, -1), 2, h).to(dev, non_blocking=True)
        fv = torch.gather(values.expand(B, -1, -1, -1, -1), 2, h).to(dev, non_blocking=True)
        u = torch.arange(T * R, device=ids.device).view(1, 1, T, R).expand(B, G, T, R)
        return fk.flatten(2, 3), fv.flatten(2, 3), u
    present = torch.zeros(B, G, n + 1, dtype=torch.bool, device=ids.device)
    present.scatter_(2, torch.where(chosen, ids, n).clamp(0, n).flatten(2), True)
    present = present[..., :n]
    U = int(present.sum(-1).max())
    order = torch.argsort((~present).to(torch.int8), dim=-1, stable=True)[..., :U]  # (B, G, U) chunk ids
    rank = present.long().cumsum(-1) - 1  # (B, G, n): a present chunk's place among the fetched
    u = rank.gather(-1, ids.clamp(0, n - 1).flatten(2)).view_as(ids)
    h = order.to(keys.device)[..., None, None].expand(B, G, U, C, d)
    fk = torch.gather(keys.expand(B, -1, -1, -1, -1), 2, h).to(dev, non_blocking=True)  # (B, G, U, C, d)
    fv = torch.gather(values.expand(B, -1, -1, -1, -1), 2, h).to(dev, non_blocking=True)
    return fk.flatten(2, 3), fv.flatten(2, 3), u


def _moves(sel, found, is_bank, ws, n_rec, remap, bank, N, offset, C):
    """Each recalled entry's position move ``[B, G, T, R, C]``. Moved queries (``remap``) lay out, right before their
    window, the bank chunks (bank order) then their own (chunk order); other queries keep their own chunks at their
    true positions and lay out only the bank chunks before the window. A bank chunk's keys are rotated at its
    position in the source; it moves into the row's frame (``offset``)."""
    B, G, T, R = sel.shape
    M = 0 if bank is None else bank.chunks
    okey = sel if bank is None else torch.where(is_bank, sel - N - M, sel)  # bank chunks first
    earlier = okey[..., None, :] < okey[..., :, None]  # (B, G, T, R, R): entry j comes before entry i
    w = ws[:, None, :, None]
    target = w - (n_rec[..., None] - (found[..., None, :] & earlier).sum(-1)) * C  # moved: everything laid out
    orig = sel * C
    moved = torch.zeros_like(found) if remap is None else remap[:, None, :, None].expand_as(found)
    if bank is None:  # own chunks stay at their true positions unless their query moves them
        return torch.where(moved & found, target - orig, 0)[..., None].expand(B, G, T, R, C)
    bank_target = w - (is_bank.sum(-1, keepdim=True) - (is_bank[..., None, :] & earlier).sum(-1)) * C
    start = bank.starts.to(sel.device)[(sel - N).clamp(0, max(M - 1, 0))]
    off = torch.zeros_like(sel) if offset is None else offset[:, None, None, None].expand_as(sel)
    orig = torch.where(is_bank, start - off, orig)
    stay = torch.where(is_bank, bank_target, orig)
    cd = torch.where(moved, target, stay) - orig
    return torch.where(found, cd, 0)[..., None].expand(B, G, T, R, C)


def _select_with_index(q_r, summ_k, at, C: int, R: int, bank, offset, freqs, interleaved: bool, d: int):
    """``mka::recall_select`` over the query's own chunks and a FAISS search of the bank (:meth:`~mka_compile.
    bounded_bank.MemoryBank.with_index`), merged by score: the R best of both, as ``recall_select`` over both
    would choose with an exact (flat) index. The index holds the bank's recall keys at offset 0; a row's queries
    have their centre part (the first ``d``, the head size) turned back by the row's offset instead (the radius part
    does not turn)."""
    B, G, T, w = q_r.shape
    N = summ_k.shape[2]
    own, own_ok = torch.ops.mka.recall_select(q_r, summ_k, at, C, R, None, None)  # (B, G, T, R)
    own_s = q_r.new_full((B, G, T, R), -torch.inf, dtype=torch.float32)
    if N:
        keys = torch.gather(summ_k.float(), 2, own.clamp(0, N - 1).flatten(2)[..., None].expand(B, G, T * R, w))
        own_s = torch.where(own_ok, (keys.view(B, G, T, R, w) * q_r.float()[..., None, :]).sum(-1), own_s)
    q = q_r.float()
    if offset is not None and freqs is not None and freqs.numel():
        centre = unrotate(q[..., :d], offset[:, None].expand(B, T), freqs, interleaved)
        q = torch.cat([centre, q[..., d:]], -1)
    bs, bi = bank.search(q.transpose(0, 1).reshape(G, B * T, w), R)  # (G, B*T, k)
    bs = bs.view(G, B, T, -1).transpose(0, 1)
    bi = bi.view(G, B, T, -1).transpose(0, 1)
    scores = torch.cat([own_s, torch.where(bi >= 0, bs, -torch.inf)], -1)
    ids = torch.cat([own, N + bi.clamp_min(0)], -1)
    top_s, top = scores.topk(R, -1)
    found = torch.isfinite(top_s)
    return torch.where(found, ids.gather(-1, top), 0), found
