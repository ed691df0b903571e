"""The memory of bounded MKA (:mod:`mka_compile.bounded`): :class:`BoundedStore`, one site's bounded keys and values.

It keeps on the model's device the sinks and the tokens from the oldest window start on (``recent``); each chunk
that leaves every window goes whole to the chunk store, in host memory (pinned on CUDA), from which a call fetches
the chunks its queries recalled. The long-term level's chunk summaries (the recall keys) stay on the device in the
MKA state. Real positions count real tokens per row (left padding is not stored).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

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
