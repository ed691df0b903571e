"""Bounded memory in fixed-size tensors, one token per row and call: the decode step ONNX exports.

:mod:`mka_compile.bounded` keeps a store whose sizes change from call to call (the recent tokens, a host chunk store
that grows) and attends to a whole call's queries at once. A file that ONNX Runtime runs needs every shape fixed,
so this module keeps the same memory as :class:`FixedStore` and answers one query per row with the same semantics
(:func:`attend_one`; tested against :func:`mka_compile.bounded.attend`):

- ``ring``: the token at real position ``p`` in slot ``p % (W + C)``, which holds a query's whole window
  ``[ws(t), t]`` (at most ``W + C - 1`` tokens);
- ``sink``: the first S tokens;
- ``chunk``: every completed chunk's tokens, ``N = max_len // C`` slots (the chunk store, passed in and out);
- ``bounds``: every completed chunk's recall key (its centre and pair radii, ``chunk_keys="bounds"``).

A call writes its token (padding writes nothing), completes a chunk when it fills one, and attends to the sinks,
its window and its R recalled chunks in one softmax, with sinks and chunks moved next to the window from the
trained length on. The token's rotation position must be its real position (as ``generate`` passes them).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from mka_compile import bounded_recall as recall
from mka_compile.config import MKAConfig
from mka_compile.kernels.bounded_attention import rotate_by, rotate_cs

FIELDS = ("count", "sink_k", "sink_v", "ring_k", "ring_v", "chunk_k", "chunk_v", "bounds")
# what a step reads but its driver writes: each store field from the part of the completed chunk a step returns
DRIVER_WRITES = {"chunk_k": "done_k", "chunk_v": "done_v", "bounds": "done_bounds"}
STORE_FIELDS = tuple(DRIVER_WRITES)
DONE_FIELDS = (*DRIVER_WRITES.values(), "done_at")  # the chunk a step completed, its recall key, its slot (-1: none)


@dataclass
class FixedStore:
    """One site's bounded memory for a batch, in fixed-size tensors (see the module docstring). All zeros is the
    empty store."""

    count: torch.Tensor  # (B,) int64 real tokens stored
    sink_k: torch.Tensor  # (B, G, S, d)
    sink_v: torch.Tensor
    ring_k: torch.Tensor  # (B, G, W + C, d)
    ring_v: torch.Tensor
    chunk_k: torch.Tensor  # (B, G, N, C, d)
    chunk_v: torch.Tensor
    bounds: torch.Tensor  # (B, G, N, d + P) float32

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    @classmethod
    def empty(cls, batch: int, kv_heads: int, head_dim: int, width: int, slots: int, cfg: MKAConfig, ref):
        """The empty store: ``width`` the recall keys' (``d + P``), ``slots`` the chunk store's (N)."""
        z = lambda *s, dt=ref.dtype: torch.zeros(*s, dtype=dt, device=ref.device)  # noqa: E731
        B, G, d, S, C = batch, kv_heads, head_dim, cfg.sink_tokens, cfg.chunk_size
        R = cfg.window + C
        N = slots if cfg.exact_recall > 0 else 0
        return cls(
            z(B, dt=torch.int64), z(B, G, S, d), z(B, G, S, d), z(B, G, R, d), z(B, G, R, d),
            z(B, G, N, C, d), z(B, G, N, C, d), z(B, G, N, width, dt=torch.float32),
        )  # fmt: skip

    @classmethod
    def from_store(cls, store, slots: int, cfg: MKAConfig, freqs, interleaved: bool) -> FixedStore:
        """The same memory as a :class:`~mka_compile.bounded_store.BoundedStore` after a PyTorch prefill (whose rows
        were rotated at their real positions, as ``generate`` does)."""
        B, G, _, d = store.recent_k.shape
        C, Wr, dev = store.chunk, cfg.window + cfg.chunk_size, store.n.device
        if store.chunk_bounds is not None:
            recall.update_bounds(store, freqs, interleaved)
        width = 0 if store.chunk_bounds is None else store.chunk_bounds.shape[-1]
        if width == 0:
            width = d + recall.pair_norms(torch.zeros(d), freqs, interleaved).shape[-1]
        out = cls.empty(B, G, d, width, slots, cfg, store.recent_k)
        n = store.n
        out.count = n.clone()
        out.sink_k, out.sink_v = store.sink_k.clone(), store.sink_v.clone()
        pos = (n[:, None] - Wr + torch.arange(Wr, device=dev)).clamp_min(0)  # the last Wr positions (B, Wr)
        k, v = store.tokens_at(pos, store.base)  # positions before the window may read stale slots: never seen
        slot = (pos % Wr)[:, None, :, None].expand(B, G, Wr, d)
        out.ring_k = out.ring_k.scatter(2, slot, k.to(out.ring_k.dtype))
        out.ring_v = out.ring_v.scatter(2, slot, v.to(out.ring_v.dtype))
        N = out.chunk_k.shape[2]
        done = int((n // C).max()) if N else 0
        if done > N:
            raise ValueError(f"the store holds {done} chunks, more than the {N} slots (max_len // chunk_size)")
        if done:
            real = torch.arange(done * C, device=dev)[None].expand(B, -1)
            ck, cv = store.tokens_at(real, store.base)
            out.chunk_k[:, :, :done] = ck.view(B, G, done, C, d)
            out.chunk_v[:, :, :done] = cv.view(B, G, done, C, d)
            out.bounds[:, :, :done] = store.chunk_bounds[:, :, :done]
        return out


def attend_one(fs: FixedStore, q, k, v, valid, cfg: MKAConfig, freqs, interleaved: bool, trained_length: int, scale):
    """One token per row: ``q: [B, H, 1, d]``, ``k, v: [B, G, 1, d]`` rotated at the row's real position,
    ``valid: [B]``. Returns ``(out [B, H, 1, d], the updated store, done)``; a padded row writes nothing. ``done =
    (done_k, done_v [B, G, C, d], done_bounds [B, G, d + P], done_at [B])``: the chunk this token completed, its
    recall key and its slot (-1: none), which the updated store holds too. An exported step returns ``done``
    instead of the whole chunk store and recall keys, and its driver writes it into the store it keeps (so no step
    copies them)."""
    B, H, _, d = q.shape
    G = k.shape[1]
    S, W, C, R = cfg.sink_tokens, cfg.window, cfg.chunk_size, cfg.exact_recall
    Wr, N = fs.ring_k.shape[2], fs.chunk_k.shape[2]
    dev = q.device
    t = fs.count  # (B,) this token's real position
    ok = valid.bool()[:, None, None, None]
    # store the token
    slot = (t % Wr)[:, None, None, None].expand(B, G, 1, d)
    ring_k = torch.where(ok, fs.ring_k.scatter(2, slot, k.to(fs.ring_k.dtype)), fs.ring_k)
    ring_v = torch.where(ok, fs.ring_v.scatter(2, slot, v.to(fs.ring_v.dtype)), fs.ring_v)
    at_sink = (torch.arange(S, device=dev)[None] == t[:, None])[:, None, :, None] & ok  # (B, 1, S, 1)
    sink_k = torch.where(at_sink, k.to(fs.sink_k.dtype), fs.sink_k)
    sink_v = torch.where(at_sink, v.to(fs.sink_v.dtype), fs.sink_v)
    chunk_k, chunk_v, bounds = fs.chunk_k, fs.chunk_v, fs.bounds
    o = torch.arange(C, device=dev)
    nothing = (
        fs.ring_k.new_zeros(B, G, C, d),
        fs.ring_v.new_zeros(B, G, C, d),
        bounds.new_zeros(B, G, bounds.shape[-1]),
    )
    done = (*nothing, torch.full_like(t, -1))
    if N:  # a token that fills its chunk completes it: the chunk's tokens and recall key go to their slot
        c = t // C
        cpos = c[:, None] * C + o  # (B, C)
        cs = (cpos % Wr)[:, None, :, None].expand(B, G, C, d)
        ck, cv = torch.gather(ring_k, 2, cs), torch.gather(ring_v, 2, cs)  # (B, G, C, d)
        ku = recall.unrotate(ck.float(), cpos, freqs, interleaved)
        mid = ku.mean(2)
        rad = recall.pair_norms(ku - mid[:, :, None], freqs, interleaved).amax(2)
        here = torch.arange(N, device=dev)[None] == c[:, None]  # (B, N)
        write = ok[..., 0] & ((t + 1) % C == 0)[:, None, None] & here[:, None]  # (B, 1, N)
        chunk_k = torch.where(write[..., None, None], ck[:, :, None], chunk_k)
        chunk_v = torch.where(write[..., None, None], cv[:, :, None], chunk_v)
        key = torch.cat([mid, rad], -1)  # (B, G, d + P)
        bounds = torch.where(write[..., None], key[:, :, None], bounds)
        done = (ck, cv, key, torch.where(valid.bool() & ((t + 1) % C == 0), c, -1))
    new = FixedStore(t + valid.long(), sink_k, sink_v, ring_k, ring_v, chunk_k, chunk_v, bounds)

    # what the query sees: sinks, recalled chunks, window
    ws = C * ((t - W + 1).clamp_min(0) // C)  # (B,)
    j = torch.arange(Wr, device=dev)
    p = t[:, None] - torch.remainder(t[:, None] - j, Wr)  # (B, Wr) the position in each ring slot
    win_ok = (p >= ws[:, None]) & (p >= 0)
    s_idx = torch.arange(S, device=dev)
    sink_ok = (s_idx[None] < ws[:, None]) & (s_idx[None] <= t[:, None])  # (B, S)
    move = None
    if trained_length > 0 and freqs is not None and freqs.numel():
        move = t >= trained_length  # (B,)
    keys, vals, oks = [sink_k], [sink_v], [sink_ok[:, None].expand(B, G, S)]
    n_rec = torch.zeros(B, G, dtype=torch.int64, device=dev)
    R_eff = min(R, N)
    if R_eff > 0:
        qu = recall.unrotate(q.float(), t[:, None], freqs, interleaved).view(B, G, H // G, d)
        q_r = torch.cat([qu.sum(2), recall.pair_norms(qu, freqs, interleaved).sum(2)], -1)  # (B, G, d + P)
        scores = torch.einsum("bgw,bgnw->bgn", q_r, fs.bounds)  # the input keys: the chunk this token completes
        avail = torch.arange(N, device=dev)[None] < (ws // C)[:, None]  # (B, N)
        vals_r, sel = scores.masked_fill(~avail[:, None], -torch.inf).topk(R_eff, -1)  # (B, G, R)
        found = torch.isfinite(vals_r)
        sel = torch.where(found, sel, N)  # in chunk order, the ones not found last
        sel, _ = sel.sort(-1)
        found = sel < N
        sel = sel.clamp(max=N - 1)
        h = sel[..., None, None].expand(B, G, R_eff, C, d)
        rk = torch.gather(fs.chunk_k, 2, h).flatten(2, 3)  # (B, G, R*C, d); the input store: the chunk this
        rv = torch.gather(fs.chunk_v, 2, h).flatten(2, 3)  # token completes is in its window, never recalled
        ci = sel[..., None] * C + o  # (B, G, R, C) real positions
        r_ok = (found[..., None] & (ci >= S)).flatten(2)
        n_rec = found.sum(-1)
        if move is not None:  # chunk r of n_rec (in chunk order) sits at ws - (n_rec - r) * C
            rank = torch.arange(R_eff, device=dev)
            target = ws[:, None, None] - (n_rec[..., None] - rank) * C  # (B, G, R)
            cd = torch.where(move[:, None, None] & found, target - sel * C, 0)
            ang = cd.to(torch.float64)[..., None] * freqs.double()  # (B, G, R, rot/2): one turn per chunk
            cos, sin = (f(ang).repeat_interleave(C, 2) for f in (torch.cos, torch.sin))  # (B, G, R*C, rot/2)
            rk = rotate_cs(rk, cos, sin, interleaved)
        keys.append(rk)
        vals.append(rv)
        oks.append(r_ok)
    if move is not None:  # the sinks sit right before the recalled chunks
        sd = torch.where(move[:, None], ws[:, None] - n_rec * C - S, 0)  # (B, G)
        keys[0] = rotate_by(sink_k, sd.to(torch.float64)[..., None, None] * freqs.double(), interleaved)
    keys.append(ring_k)
    vals.append(ring_v)
    oks.append(win_ok[:, None].expand(B, G, Wr))
    kk, vv, mask = torch.cat(keys, 2), torch.cat(vals, 2), torch.cat(oks, 2)  # (B, G, M, d), (B, G, M)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qq = q.view(B, G, H // G, d).to(acc)
    sc = torch.einsum("bgrd,bgmd->bgrm", qq, kk.to(acc)) * scale
    sc = sc.masked_fill(~mask[:, :, None], -torch.inf)
    out = torch.einsum("bgrm,bgmd->bgrd", torch.softmax(sc, -1), vv.to(acc))
    return out.reshape(B, H, 1, d).to(q.dtype), new, done
