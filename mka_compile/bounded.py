"""Bounded memory (``MKAConfig(window=W, sink_tokens=S)``): the local level attends exactly to a bounded set of keys.

For a query at real (padding-free) position ``t``, with chunks of C real tokens (chunk ``c`` = tokens
``[cC, (c+1)C)``, the chunks of the long-term level):

- the **window**: tokens ``[ws(t), t]`` with ``ws(t) = C * floor(max(0, t - W + 1) / C)``, the start of the chunk
  that holds the window's first token (so the window holds W to W + C - 1 tokens, and chunks leave it whole);
- the **sinks**: the first S tokens (those not already in the window);
- the **recalled chunks**: the R chunks ``c < ws(t) / C`` whose summary keys (the long-term level's chunk means of
  the un-rotated keys) score highest against the query's recall query (``mka::recall_select``), attended token by
  token (the sink tokens in them are left out: they are attended as sinks).

One softmax over all of them (``mka::bounded_attention``). So up to S + W tokens (indeed up to W + C - 1) a query
sees every token: the converted model at init equals the original; when R chunks cover the whole past, too.
Recall is decided per query token, in prefill as in decode, so decode equals prefill.

**Positions.** Keys are kept rotated at their true positions. A query at ``t >= trained_length`` sees the sinks,
then its recalled chunks in chunk order, then its window, laid out contiguously and ending at ``t`` (as
StreamingLLM lays out its cache): the largest distance is then at most :meth:`MKAConfig.bounded_span`, within what
the model was trained on; ``mka::bounded_attention`` moves each key by its position change (``delta``).

**Memory.** :class:`~mka_compile.bounded_store.BoundedStore` keeps on the model's device the sinks and the
recent tokens; older chunks go to host memory (:mod:`mka_compile.bounded_store`).
"""

from __future__ import annotations

import torch

from mka_compile import bounded_recall as recall
from mka_compile import kernels as K
from mka_compile.bounded_store import BoundedStore
from mka_compile.config import MKAConfig
from mka_compile.kernels.bounded_attention import rotate_cs

__all__ = ["BoundedStore", "attend"]


# -- the attention of one call ------------------------------------------------------------------------------
def attend(
    store: BoundedStore,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    q_r: torch.Tensor | None,
    summ_k: torch.Tensor | None,
    cfg: MKAConfig,
    freqs: torch.Tensor | None,
    interleaved: bool,
    trained_length: int,
    scale: float,
    bank=None,
    rot_pos: torch.Tensor | None = None,
    site: str = "",
) -> torch.Tensor:
    """Bounded attention of one call. ``q: [B, H, T, d]``, ``k, v: [B, G, T, d]`` as the site attends to them
    (rotated at their true positions); ``valid: [B, T]``; ``q_r: [B, G, T, d]`` the recall queries and ``summ_k:
    [B, G, N, d]`` the chunk summaries (None without recall; unused when the store keeps chunk bounds,
    ``chunk_keys="bounds"``); ``freqs: [rot/2]`` the RoPE frequencies (None: no
    RoPE); ``trained_length``: from which position keys are moved (0: never); ``bank``: a
    :class:`~mka_compile.bounded_bank.BankLayer` whose chunks the queries may recall too, placed in the positions
    ``rot_pos: [B, T]`` the model rotated the call at (None: the real positions; ``site`` names it in errors).
    Returns ``[B, H, T, d]``."""
    qpos = store.append(k, v, valid)  # (B, T)
    B, H, T, d = q.shape
    G = k.shape[1]
    S, C, R = cfg.sink_tokens, cfg.chunk_size, cfg.exact_recall
    dev = q.device
    real = qpos >= 0
    t = qpos.clamp_min(0)
    ws = store.window_start(t)  # (B, T)
    remap = None
    if trained_length > 0 and freqs is not None and freqs.numel():
        remap = real & (t >= trained_length)  # (B, T)
        if not bool(remap.any()):
            remap = None
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    n_rec = torch.zeros(B, G, T, dtype=torch.int64, device=dev)  # chunks each query recalled
    far = None  # the recalled entries: (pool_k, pool_v, idx, delta)
    if R > 0 and store.chunk_bounds is not None:  # chunk_keys="bounds": the store's own chunk bounds
        recall.update_bounds(store, freqs, interleaved)
        q_r, summ_k = recall.recall_keys(store, q, t, freqs, interleaved)
    if bank is not None and bank.chunks == 0:
        bank = None
    if bank is not None:
        from mka_compile.bounded_bank import check_bank

        check_bank(bank, store, q_r.shape[-1], site)
    if R > 0 and summ_k is not None and (summ_k.shape[2] > 0 or bank is not None):
        offset = None  # the row's rotation positions minus its real ones (a bank chunk is placed in the row's frame)
        if bank is not None and rot_pos is not None:
            big = torch.iinfo(torch.int64).max
            offset = torch.where(real, rot_pos.to(dev) - t, big).amin(-1)
            offset = torch.where(offset == big, 0, offset)  # (B,)
        *far, n_rec = recall.entries(store, q, ws, real, q_r, summ_k, cfg, remap, freqs, interleaved, bank, offset)
    s_delta = None  # the sinks sit right before the recalled chunks, which sit right before the window
    if remap is not None:
        s_delta = torch.where(remap[:, None], ws[:, None] - n_rec * C - S, zero)  # (B, G, T)
    if T <= GATHER_QUERIES:
        out = _gathered_attention(q, store, t, real, ws, scale, s_delta, freqs, interleaved, far)
    else:
        out, lse = _window_attention(q, store, t, real, ws, scale, s_delta, freqs, interleaved)
        if far is not None:
            pool_k, pool_v, idx, delta = far
            fr = freqs if delta is not None else None
            delta = torch.zeros_like(idx) if delta is None else delta
            args = (idx.contiguous(), delta.contiguous(), fr, scale, interleaved)
            out = _merge(out, lse, *K.bounded_attention(q, pool_k.to(q.dtype), pool_v.to(q.dtype), *args, run=C))
    store.settle()
    return out.to(q.dtype)


GATHER_QUERIES = 16  # calls of at most this many queries (decode steps) attend in one mka::bounded_attention
WINDOW_BLOCK = 256  # queries per block of the dense window attention


def _gathered_attention(q, store: BoundedStore, t, real, ws, scale: float, s_delta, freqs, interleaved: bool, far):
    """A short call's attention as one ``mka::bounded_attention`` over a pool of the call's recalled entries (``far``,
    from :func:`~mka_compile.bounded_recall.entries`, or ``store.recent`` alone), its sinks (moved by ``s_delta``)
    and its window: the same set and moves as :func:`_window_attention` merged with the recalled entries, with one
    op instead of a dense window attention per block (the form of a decode step)."""
    B, H, T, d = q.shape
    G = store.recent_k.shape[1]
    S, C, W = store.sinks, store.chunk, store.window
    dev = q.device
    if far is None:
        pool_k, pool_v, idx, delta = store.recent_k, store.recent_v, None, None
    else:
        pool_k, pool_v, idx, delta = far
    P = pool_k.shape[2]
    j = torch.arange(W + C - 1, device=dev)  # a window holds at most W + C - 1 tokens
    wpos = ws[..., None] + j  # (B, T, W + C - 1) real positions
    w_ok = real[..., None] & (wpos <= t[..., None])
    parts_i = [torch.where(w_ok, wpos - store.base[:, None, None], -1)[:, None].expand(B, G, T, -1)]
    parts_d = [torch.zeros_like(parts_i[0])]
    if S:
        s = torch.arange(S, device=dev)
        s_ok = real[..., None] & (s < ws[..., None])  # (B, T, S): the sinks not in the window
        parts_i.append(torch.where(s_ok, P + s, -1)[:, None].expand(B, G, T, S))
        parts_d.append(torch.zeros_like(parts_i[-1]) if s_delta is None else s_delta[..., None].expand(B, G, T, S))
        pool_k = torch.cat([pool_k, store.sink_k], 2)
        pool_v = torch.cat([pool_v, store.sink_v], 2)
    if idx is not None:
        parts_i.append(idx)
        parts_d.append(torch.zeros_like(idx) if delta is None else delta)
    if pool_k.shape[2] == 0:  # nothing stored yet (every token of the call padding): no key to attend to
        return torch.zeros_like(q)
    moved = s_delta is not None or delta is not None
    ix = torch.cat(parts_i, -1).contiguous()
    dl = torch.cat(parts_d, -1).contiguous()
    fr = freqs if moved else None
    out, _ = K.bounded_attention(q, pool_k.to(q.dtype), pool_v.to(q.dtype), ix, dl, fr, scale, interleaved)
    return out


def _window_attention(q, store: BoundedStore, t, real, ws, scale: float, s_delta, freqs, interleaved: bool):
    """Each query's window ``[ws(t), t]`` from ``store.recent`` and its sinks (those before the window; moved by
    ``s_delta: [B, G, T]`` when given), as dense attention over the keys its block of queries spans, masked per query:
    ``(out [B, H, T, d], lse [B, H, T])`` in the accumulation dtype."""
    B, H, T, d = q.shape
    G = store.recent_k.shape[1]
    S = store.sinks
    rep = H // G
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(B, H, T, d, dtype=acc, device=q.device)
    lse = torch.full((B, H, T), -torch.inf, dtype=acc, device=q.device)
    base = store.base[:, None]
    sk, sv = store.sink_k.to(acc), store.sink_v.to(acc)  # (B, G, S, d)
    for a in range(0, T, WINDOW_BLOCK):
        b = min(T, a + WINDOW_BLOCK)
        tb, wb, rb = t[:, a:b], ws[:, a:b], real[:, a:b]
        if not bool(rb.any()):
            continue
        lo = int(torch.where(rb, wb - base, torch.iinfo(torch.int64).max).min())
        hi = int(torch.where(rb, tb - base, -1).max()) + 1
        kk = store.recent_k[:, :, lo:hi].to(acc)  # (B, G, L, d)
        vv = store.recent_v[:, :, lo:hi].to(acc)
        ki = base + lo + torch.arange(hi - lo, device=q.device)  # (B, L) real positions
        vis = rb[..., None] & (ki[:, None, :] >= wb[..., None]) & (ki[:, None, :] <= tb[..., None])  # (B, tb, L)
        qq = q[:, :, a:b].reshape(B, G, rep, b - a, d).to(acc)
        sc = torch.einsum("bgrtd,bgld->bgrtl", qq, kk) * scale
        sc = sc.masked_fill(~vis[:, None, None], -torch.inf)
        if S:
            qs = qq
            if s_delta is not None:  # q . R(delta) k = R(-delta) q . k: turn the query once for its sinks
                ang = s_delta[:, :, a:b].to(torch.float64)[..., None] * freqs.to(torch.float64)  # (B, G, tb, h)
                qs = rotate_cs(qq, torch.cos(ang)[:, :, None].to(acc), -torch.sin(ang)[:, :, None].to(acc), interleaved)
            s_ok = rb[..., None] & (torch.arange(S, device=q.device) < wb[..., None])  # (B, tb, S)
            ss = torch.einsum("bgrtd,bgsd->bgrts", qs, sk) * scale
            sc = torch.cat([ss.masked_fill(~s_ok[:, None, None], -torch.inf), sc], -1)
            vv = torch.cat([sv, vv], 2)
        m = torch.logsumexp(sc, -1, keepdim=True)  # (B, G, rep, tb, 1)
        some = torch.isfinite(m)
        p = torch.exp(sc - torch.where(some, m, torch.zeros_like(m)))
        out[:, :, a:b] = torch.einsum("bgrtl,bgld->bgrtd", p, vv).reshape(B, H, b - a, d)
        lse[:, :, a:b] = m.reshape(B, H, b - a)
    return out, lse


def _merge(o1, lse1, o2, lse2):
    """One softmax over two disjoint key sets, from each set's normalised output and log-sum-exp."""
    lse2 = lse2.to(lse1.dtype)
    m = torch.maximum(lse1, lse2)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w1, w2 = torch.exp(lse1 - m)[..., None], torch.exp(lse2 - m)[..., None]
    den = w1 + w2
    return (w1 * o1 + w2 * o2.to(o1.dtype)) / torch.where(den > 0, den, torch.ones_like(den))
