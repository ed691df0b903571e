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

from mka_compile import kernels as K
from mka_compile.config import MKAConfig


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

    @classmethod
    def empty(cls, batch: int, kv_heads: int, head_dim: int, ref: torch.Tensor, cfg: MKAConfig) -> BoundedStore:
        dev, dt = ref.device, ref.dtype
        host, pin = _host_for(dev)
        z = lambda *shape: torch.zeros(*shape, dtype=dt, device=dev)  # noqa: E731
        zh = lambda *shape: torch.zeros(*shape, dtype=dt, device=host, pin_memory=pin)  # noqa: E731
        S, C = cfg.sink_tokens, cfg.chunk_size
        zi = torch.zeros(batch, dtype=torch.int64, device=dev)
        return cls(
            cfg.window, S, C,
            z(batch, kv_heads, S, head_dim), z(batch, kv_heads, S, head_dim),
            z(batch, kv_heads, 0, head_dim), z(batch, kv_heads, 0, head_dim),
            zi, zi.clone(),
            zh(batch, kv_heads, 0, C, head_dim), zh(batch, kv_heads, 0, C, head_dim),
        )  # fmt: skip

    # -- where tokens are -------------------------------------------------------------------------------
    def window_start(self, t: torch.Tensor) -> torch.Tensor:
        """``ws(t)`` for real positions ``t`` (any shape, int64)."""
        C = self.chunk
        return C * ((t - self.window + 1).clamp_min(0) // C)

    def _tokens(self, real: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        lo, hi = int(torch.minimum(self.base, target).min()), int(torch.maximum(self.base, target).max())
        if hi > lo and bool((target > self.base).any()):  # chunks leaving recent: copy them whole to the store
            self._ensure_chunks(hi // C)
            real = torch.arange(lo, hi, device=self.base.device).expand(self.base.shape[0], -1)  # (B, hi - lo)
            ks, vs = self._tokens(real, self.base)
            leave = (real >= self.base[:, None]) & (real < target[:, None])  # (B, hi - lo)
            for store, new in ((self.chunk_k, ks), (self.chunk_v, vs)):
                region = store[:, :, lo // C : hi // C].flatten(2, 3)  # (B, G, hi - lo, d) view
                m = leave[:, None, :, None].to(region.device)
                region.copy_(torch.where(m, new.to(region.device), region))
        keep = int((self.n - target).clamp_min(0).max())
        real = target[:, None] + torch.arange(keep, device=target.device)  # (B, keep)
        self.recent_k, self.recent_v = self._tokens(real, self.base)
        self.base = target

    # -- a call ---------------------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Store a call's keys and values ``[B, G, T, d]`` (as the site attends to them, rotated) for its real tokens
        ``valid: [B, T]``; returns their real positions ``[B, T]`` (-1 for padding)."""
        self.settle()  # (a store that was cropped)
        B, G, T, d = k.shape
        valid = valid.to(self.n.device)
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

    def settle(self) -> None:
        """After a call: chunks no later query sees leave the device for the chunk store."""
        self._rebase(torch.maximum(self.base, self.window_start(self.n)))

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
        self.tail_real -= remove
        self.positions -= remove
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
        per_chunk = self.chunk_k[:, :, :1].numel() // max(self.chunk_k.shape[0], 1) * self.chunk_k.element_size()
        stored = int((self.base // self.chunk).sum()) if self.chunk_k.shape[2] else 0
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
) -> torch.Tensor:
    """Bounded attention of one call. ``q: [B, H, T, d]``, ``k, v: [B, G, T, d]`` as the site attends to them
    (rotated at their true positions); ``valid: [B, T]``; ``q_r: [B, G, T, d]`` the recall queries and ``summ_k:
    [B, G, N, d]`` the chunk summaries (None without recall); ``freqs: [rot/2]`` the RoPE frequencies (None: no
    RoPE); ``trained_length``: from which position keys are moved (0: never). Returns ``[B, H, T, d]``."""
    qpos = store.append(k, v, valid)  # (B, T)
    B, H, T, d = q.shape
    G = k.shape[1]
    S, W, C, R = cfg.sink_tokens, cfg.window, cfg.chunk_size, cfg.exact_recall
    dev = q.device
    real = qpos >= 0
    t = qpos.clamp_min(0)
    ws = store.window_start(t)  # (B, T)
    base = store.base
    Lr = store.recent_k.shape[2]
    # the window: real positions t - m, m < W + C - 1, from ws(t) on
    wi = t[..., None] - torch.arange(W + C - 1, device=dev)  # (B, T, Mw)
    w_ok = real[..., None] & (wi >= ws[..., None])
    w_idx = torch.where(w_ok, S + wi - base[:, None, None], -1)
    # the sinks not in the window
    s = torch.arange(S, device=dev)
    s_ok = real[..., None] & (s < ws[..., None])  # (B, T, S)
    s_idx = torch.where(s_ok, s.expand_as(s_ok), -1)
    parts_idx = [s_idx[:, None].expand(B, G, T, S), w_idx[:, None].expand(B, G, T, w_idx.shape[-1])]
    parts_k, parts_v = [store.sink_k, store.recent_k], [store.sink_v, store.recent_v]
    remap = None
    if trained_length > 0 and freqs is not None and freqs.numel():
        remap = real & (t >= trained_length)  # (B, T)
        if not bool(remap.any()):
            remap = None
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    s_delta = torch.zeros(B, G, T, S, dtype=torch.int64, device=dev)
    c_idx = c_delta = None
    if R > 0 and summ_k is not None and summ_k.shape[2] > 0:
        at = torch.where(real, ws, 0)  # recall among the chunks c < ws(t) / C
        sel, found = torch.ops.mka.recall_select(q_r, summ_k, at, C, R, None, None)  # (B, G, T, R)
        stored = base // C  # (B,) chunks in the host store
        in_store = found & (sel < stored[:, None, None, None])
        o = torch.arange(C, device=dev)
        ci = sel[..., None] * C + o  # (B, G, T, R, C) real positions
        c_ok = found[..., None] & (ci >= S)
        slot = S + ci - base[:, None, None, None, None]  # in recent
        n_st = int(stored.max())
        if n_st > 0 and bool(in_store.any()):
            present = torch.zeros(B, G, n_st + 1, dtype=torch.bool, device=dev)
            present.scatter_(2, torch.where(in_store, sel, n_st).flatten(2), True)
            present = present[..., :n_st]
            U = int(present.sum(-1).max())
            order = torch.argsort((~present).to(torch.int8), dim=-1, stable=True)[..., :U]  # (B, G, U) chunk ids
            rank = present.long().cumsum(-1) - 1  # (B, G, n_st): a present chunk's place among the fetched
            u = rank.gather(-1, sel.clamp(max=n_st - 1).flatten(2)).view_as(sel)
            h = order.to(store.chunk_k.device)[..., None, None].expand(B, G, U, C, d)
            fk = torch.gather(store.chunk_k, 2, h).to(dev, non_blocking=True)  # (B, G, U, C, d)
            fv = torch.gather(store.chunk_v, 2, h).to(dev, non_blocking=True)
            parts_k.append(fk.flatten(2, 3).to(store.recent_k.dtype))
            parts_v.append(fv.flatten(2, 3).to(store.recent_v.dtype))
            slot = torch.where(in_store[..., None], S + Lr + u[..., None] * C + o, slot)
        c_idx = torch.where(c_ok, slot, -1).flatten(3)  # (B, G, T, R*C)
        if remap is not None:  # sinks, then the recalled chunks in chunk order, then the window, ending at t
            n_rec = found.sum(-1)  # (B, G, T)
            before = (found[..., None, :] & (sel[..., None, :] < sel[..., :, None])).sum(-1)  # (B, G, T, R)
            wsg = ws[:, None]
            cd = wsg[..., None] - (n_rec[..., None] - before) * C - sel * C  # (B, G, T, R)
            c_delta = torch.where(remap[:, None, :, None], cd, zero)[..., None].expand(B, G, T, R, C).flatten(3)
            sd = (wsg - n_rec * C - S)[..., None]  # (B, G, T, 1)
            s_delta = torch.where(remap[:, None, :, None], sd, zero).expand(B, G, T, S)
    elif remap is not None:
        sd = (ws - S)[:, None, :, None]
        s_delta = torch.where(remap[:, None, :, None], sd, zero).expand(B, G, T, S)
    idx = torch.cat(parts_idx + ([c_idx] if c_idx is not None else []), -1)
    delta = torch.cat(
        [s_delta, torch.zeros(B, G, T, w_idx.shape[-1], dtype=torch.int64, device=dev)]
        + ([c_delta if c_delta is not None else torch.zeros_like(c_idx)] if c_idx is not None else []),
        -1,
    )
    pool_k = torch.cat(parts_k, 2).to(q.dtype)
    pool_v = torch.cat(parts_v, 2).to(q.dtype)
    fr = freqs if (remap is not None and freqs is not None) else None
    out, _ = K.bounded_attention(q, pool_k, pool_v, idx.contiguous(), delta.contiguous(), fr, scale, interleaved)
    store.settle()
    return out


def _bytes(obj, seen: set[int]) -> int:
    """Bytes of the tensors in ``obj`` (tensors, lists, tuples, dicts, dataclasses), each storage counted once."""
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr() if obj.numel() else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes() if obj.numel() else 0
    if isinstance(obj, (list, tuple)):
        return sum(_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(_bytes(o, seen) for o in obj.values())
    if hasattr(obj, "__dataclass_fields__"):
        return sum(_bytes(getattr(obj, f.name), seen) for f in fields(obj))
    return 0


def memory_report(cache) -> dict[str, int]:
    """What ``cache`` (a transformers ``Cache``, converted or not) holds: ``resident_bytes`` on the model's device
    (bounded layers: sinks and recent tokens; other layers: every key and value; the MKA state: session EMA, chunk
    summaries, the crop history), ``offloaded_bytes`` (bounded layers' chunk stores, in host memory) and ``tokens``
    (the most real tokens a layer holds)."""
    from mka_compile import hf_cache

    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        raise ValueError(f"memory_report takes a transformers Cache (with .layers); got {type(cache).__name__}")
    resident = offloaded = tokens = 0
    seen: set[int] = set()
    for layer in layers:
        store = getattr(layer, "store", None)
        if isinstance(store, BoundedStore):
            r, o = store.nbytes()
            resident, offloaded = resident + r, offloaded + o
            tokens = max(tokens, int(store.n.max()) if store.n.numel() else 0)
        else:
            resident += _bytes([getattr(layer, "keys", None), getattr(layer, "values", None)], seen)
            tokens = max(tokens, int(layer.get_seq_length()) if hasattr(layer, "get_seq_length") else 0)
    resident += _bytes(getattr(cache, hf_cache.STATES_ATTR, None) or {}, seen)
    return {"resident_bytes": int(resident), "offloaded_bytes": int(offloaded), "tokens": int(tokens)}
