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

**Memory.** :class:`BoundedStore` keeps on the model's device the sinks and the tokens from the oldest window start
on (``recent``); each chunk that leaves every window goes whole to the chunk store, in host memory (pinned on CUDA),
from which a call fetches the chunks its queries recalled. The long-term level's chunk summaries (the recall keys)
stay on the device in the MKA state.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from mka_compile import bounded_recall as recall
from mka_compile import kernels as K
from mka_compile.config import MKAConfig
from mka_compile.kernels.bounded_attention import rotate_cs


def _host_for(device: torch.device) -> tuple[torch.device, bool]:
    """Where the chunk store lives: host memory (pinned when the model is on CUDA)."""
    return torch.device("cpu"), device.type == "cuda"


@dataclass
class BoundedStore:
    """One site's bounded keys and values for one sequence batch (a cache layer, or one call without a cache).

    Real positions count real tokens per row (left padding is not stored). ``recent`` holds, per row, the tokens
    ``[base, n)`` at slots ``0 .. n - base - 1``; the chunk store holds chunks ``c < base / C``."""

    window: int
    sinks: int
    chunk: int
    sink_k: torch.Tensor  # (B, G, S, d)
    sink_v: torch.Tensor
    recent_k: torch.Tensor  # (B, G, L, d)
    recent_v: torch.Tensor
    base: torch.Tensor  # (B,) int64, a multiple of chunk
    n: torch.Tensor  # (B,) int64 real tokens stored
    chunk_k: torch.Tensor  # (B, G, N, C, d) on the host
    chunk_v: torch.Tensor
    tail_real: int = 0  # the latest positions (slots) that were real tokens in every row: what crop may remove
    positions: int = 0  # positions stored, padding included
    keep_chunks: bool = True  # False (recall_chunks=0: window and sinks only): chunks that leave are dropped
    # chunk_keys="bounds", on the device, (B, G, N, d + P) float32: each completed chunk's recall key, its centre (the
    # mean un-rotated key) then its radius per channel pair (P = rot/2 + d - rot pairs; mka_compile.bounded_recall)
    chunk_bounds: torch.Tensor | None = None
    bounds_done: torch.Tensor | None = None  # (B,) int64: chunks whose bounds are computed
    cropped: bool = False  # a crop moved ``base`` back: the next call settles the store first

    @classmethod
    def empty(cls, batch: int, kv_heads: int, head_dim: int, ref: torch.Tensor, cfg: MKAConfig) -> BoundedStore:
        dev, dt = ref.device, ref.dtype
        host, pin = _host_for(dev)
        z = lambda *shape: torch.zeros(*shape, dtype=dt, device=dev)  # noqa: E731
        zh = lambda *shape: torch.zeros(*shape, dtype=dt, device=host, pin_memory=pin)  # noqa: E731
        S, C = cfg.sink_tokens, cfg.chunk_size
        zi = torch.zeros(batch, dtype=torch.int64, device=dev)
        store = cls(
            cfg.window, S, C,
            z(batch, kv_heads, S, head_dim), z(batch, kv_heads, S, head_dim),
            z(batch, kv_heads, 0, head_dim), z(batch, kv_heads, 0, head_dim),
            zi, zi.clone(),
            zh(batch, kv_heads, 0, C, head_dim), zh(batch, kv_heads, 0, C, head_dim),
            keep_chunks=cfg.exact_recall > 0,
        )  # fmt: skip
        if cfg.exact_recall > 0 and cfg.chunk_keys == "bounds":
            store.chunk_bounds = torch.zeros(batch, kv_heads, 0, 0, dtype=torch.float32, device=dev)
            store.bounds_done = zi.clone()
        return store

    # -- where tokens are -------------------------------------------------------------------------------
    def window_start(self, t: torch.Tensor) -> torch.Tensor:
        """``ws(t)`` for real positions ``t`` (any shape, int64)."""
        C = self.chunk
        return C * ((t - self.window + 1).clamp_min(0) // C)

    def tokens_at(self, real: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of real positions ``real: [B, L]`` (>= 0; before ``base`` from the chunk store, from
        ``base`` on from ``recent``) -> ``[B, G, L, d]`` each on the model's device."""
        B, G, _, d = self.recent_k.shape
        L = real.shape[1]
        in_recent = real >= base[:, None]
        slot = (real - base[:, None]).clamp(0, max(self.recent_k.shape[2] - 1, 0))
        out = []
        for rec, store in ((self.recent_k, self.chunk_k), (self.recent_v, self.chunk_v)):
            got = rec.new_zeros(B, G, L, d)
            if rec.shape[2]:
                got = torch.gather(rec, 2, slot[:, None, :, None].expand(B, G, L, d))
            if store.shape[2] and not bool(in_recent.all()):
                flat = store.flatten(2, 3)  # (B, G, N*C, d)
                hs = real.clamp(0, flat.shape[2] - 1).to(flat.device)
                old = torch.gather(flat, 2, hs[:, None, :, None].expand(B, G, L, d)).to(rec.device)
                got = torch.where(in_recent[:, None, :, None], got, old)
            out.append(got)
        return out[0], out[1]

    def _ensure_chunks(self, n: int) -> None:
        have = self.chunk_k.shape[2]
        if n <= have:
            return
        new = max(n, 2 * have, 4)
        pin = self.chunk_k.is_pinned()
        for name in ("chunk_k", "chunk_v"):
            old = getattr(self, name)
            grown = torch.zeros(*old.shape[:2], new, *old.shape[3:], dtype=old.dtype, device=old.device, pin_memory=pin)
            grown[:, :, :have] = old
            setattr(self, name, grown)

    def _rebase(self, target: torch.Tensor) -> None:
        """Make ``target`` (``[B]``, chunk aligned) the new ``base``: chunks that leave ``recent`` go to the chunk
        store, chunks that come back (a crop) are read from it."""
        if bool((target == self.base).all()):
            return
        C = self.chunk
        if not self.keep_chunks and bool((target < self.base).any()):
            raise RuntimeError(
                "bounded MKA memory without recall (recall_chunks=0) keeps no chunk that left the window: it cannot "
                "crop back past the window's start; crop fewer tokens, or start the sequence again"
            )
        lo, hi = int(torch.minimum(self.base, target).min()), int(torch.maximum(self.base, target).max())
        if self.keep_chunks and hi > lo and bool((target > self.base).any()):  # chunks leaving recent: to the store
            self._ensure_chunks(hi // C)
            real = torch.arange(lo, hi, device=self.base.device).expand(self.base.shape[0], -1)  # (B, hi - lo)
            ks, vs = self.tokens_at(real, self.base)
            leave = (real >= self.base[:, None]) & (real < target[:, None])  # (B, hi - lo)
            for store, new in ((self.chunk_k, ks), (self.chunk_v, vs)):
                region = store[:, :, lo // C : hi // C].flatten(2, 3)  # (B, G, hi - lo, d) view
                m = leave[:, None, :, None].to(region.device)
                region.copy_(torch.where(m, new.to(region.device), region))
        keep = int((self.n - target).clamp_min(0).max())
        real = target[:, None] + torch.arange(keep, device=target.device)  # (B, keep)
        self.recent_k, self.recent_v = self.tokens_at(real, self.base)
        self.base = target

    # -- a call ---------------------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Store a call's keys and values ``[B, G, T, d]`` (as the site attends to them, rotated) for its real tokens
        ``valid: [B, T]``; returns their real positions ``[B, T]`` (-1 for padding)."""
        if self.cropped:
            self.settle()
        B, G, T, d = k.shape
        valid = valid.to(self.n.device)
        if self._appends_at_the_end(valid):  # every row real, past its sinks, its recent tokens end at one slot
            pos = self.n[:, None] + torch.arange(T, device=self.n.device)
            self.recent_k = torch.cat([self.recent_k, k.to(self.recent_k.dtype)], 2)
            self.recent_v = torch.cat([self.recent_v, v.to(self.recent_v.dtype)], 2)
            self.n = self.n + T
            self.positions += T
            self.tail_real += T
            return pos
        pos = self.n[:, None] + valid.long().cumsum(-1) - 1  # (B, T)
        cnt = valid.long().sum(-1)
        length = int((self.n + cnt - self.base).max())
        b_idx, t_idx = valid.nonzero(as_tuple=True)
        slot = pos[b_idx, t_idx] - self.base[b_idx]
        sink = pos[b_idx, t_idx] < self.sinks
        for name, sink_name, x in (("recent_k", "sink_k", k), ("recent_v", "sink_v", v)):
            old = getattr(self, name)
            new = old.new_zeros(B, G, length, d)
            new[:, :, : old.shape[2]] = old[:, :, :length]
            rows = x.transpose(1, 2)[b_idx, t_idx].to(new.dtype)  # (n_valid, G, d)
            new.transpose(1, 2)[b_idx, slot] = rows
            setattr(self, name, new)
            if bool(sink.any()):
                getattr(self, sink_name).transpose(1, 2)[b_idx[sink], pos[b_idx, t_idx][sink]] = rows[sink]
        self.n = self.n + cnt
        self.positions += T
        all_real = valid.all(0)
        trailing = int(torch.flip(all_real, (0,)).long().cumprod(0).sum())
        self.tail_real = self.tail_real + T if trailing == T else trailing
        return torch.where(valid, pos, -1)

    def _appends_at_the_end(self, valid: torch.Tensor) -> bool:
        """Whether a call's tokens simply follow ``recent`` (the common decode step): all real, no sink among them,
        and every row's recent tokens fill ``recent`` exactly."""
        if self.sinks and int(self.n.min()) < self.sinks:
            return False
        return bool(valid.all()) and bool((self.n - self.base == self.recent_k.shape[2]).all())

    def settle(self) -> None:
        """After a call: chunks no later query sees leave the device for the chunk store."""
        self._rebase(torch.maximum(self.base, self.window_start(self.n)))
        self.cropped = False

    def crop(self, remove: int) -> None:
        """Forget the latest ``remove`` positions (real tokens in every row; see ``tail_real``)."""
        if remove <= 0:
            return
        if remove > self.tail_real:
            raise RuntimeError(
                f"bounded MKA memory: cannot crop {remove} positions; the latest {self.tail_real} are real tokens in "
                "every row, earlier ones include padding (crop only tokens decoded after the prompt)"
            )
        self.n = self.n - remove
        if self.bounds_done is not None:  # a chunk the crop reopens gets its bounds again when it completes
            self.bounds_done = torch.minimum(self.bounds_done, self.n // self.chunk)
        self.tail_real -= remove
        self.positions -= remove
        self.cropped = True
        self._rebase(torch.minimum(self.base, self.window_start(self.n)))
        self.recent_k = self.recent_k[:, :, : int((self.n - self.base).max())]
        self.recent_v = self.recent_v[:, :, : self.recent_k.shape[2]]
        keep = torch.arange(self.sinks, device=self.n.device)[None, :] < self.n[:, None]  # (B, S)
        m = keep[:, None, :, None]
        self.sink_k, self.sink_v = self.sink_k * m, self.sink_v * m

    def map_batch(self, fn) -> None:
        """Apply a batch edit (beam reorder, row selection or repeat) to every tensor."""
        for f in fields(self):
            val = getattr(self, f.name)
            if isinstance(val, torch.Tensor):
                setattr(self, f.name, fn(val))

    def nbytes(self) -> tuple[int, int]:
        """``(resident, offloaded)`` bytes: sinks and recent tokens on the device; the stored chunks on the host."""
        res = sum(t.numel() * t.element_size() for t in (self.sink_k, self.sink_v, self.recent_k, self.recent_v))
        res += 2 * self.n.numel() * self.n.element_size()
        if self.chunk_bounds is not None:
            res += sum(t.numel() * t.element_size() for t in (self.chunk_bounds, self.bounds_done))
        per_chunk = self.chunk_k[:, :, :1].numel() // max(self.chunk_k.shape[0], 1) * self.chunk_k.element_size()
        stored = int((self.base // self.chunk).sum()) if self.chunk_k.shape[2] and self.keep_chunks else 0
        return res, 2 * stored * per_chunk


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
