"""Bounded (gathered) attention: each query attends to its own list of keys, gathered from a pool.

The L1 level of bounded-memory MKA (``MKAConfig(window=W, sink_tokens=S)``): a query attends exactly to the sinks,
its window and the tokens of the chunks it recalled, in one softmax. Which keys each query sees, and at which
position, is decided by :mod:`mka_compile.bounded`; this op only computes

    out[b, h, t] = sum_m p_m v[b, g, idx[b, g, t, m]],
    p = softmax_m( scale * q[b, h, t] . rot(k[b, g, idx[b, g, t, m]], delta[b, g, t, m] * freqs) )

with ``g = h // (H / Hkv)`` (GQA), entries ``idx < 0`` left out, and ``rot(x, a)`` the RoPE rotation of ``x`` by
the angles ``a`` (rotate-half pairs ``(i, i + rot/2)``, or interleaved pairs ``(2i, 2i+1)`` when ``interleaved``;
``rot = 2 * len(freqs)`` leading features, the rest pass). The keys in the pool are already rotated at their true
positions; ``delta`` moves a key to another position (``delta = 0``: as it is; ``freqs`` empty: no rotation), which
is how sinks and recalled chunks are placed within the positions the model was trained on.

Shapes: ``q: [B, H, T, d]``; ``k, v: [B, Hkv, P, d]`` (the pool); ``idx, delta: [B, Hkv, T, M]`` int64;
``freqs: [rot/2]`` float32. Returns ``out: [B, H, T, d]`` (q's dtype; 0 for a query with no entry) and
``lse: [B, H, T]`` float32 (float64 for float64 inputs), the log-sum-exp of the scaled scores (``-inf`` for a
query with no entry).
"""

from __future__ import annotations

import torch

from .. import _validate as check
from .._dtypes import acc_dtype
from .._grads import new_like
from ..declare import Backward, declare

BLOCK_T = 128  # queries per block in the reference: bounds its memory to BLOCK_T * M gathered keys per head


def rotate_by(x: torch.Tensor, angles: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """``x: [..., d]`` rotated by ``angles: [..., rot/2]`` (broadcast), RoPE pairs as in the module docstring."""
    return rotate_cs(x, torch.cos(angles), torch.sin(angles), interleaved)


def rotate_cs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """:func:`rotate_by` given the angles' ``cos, sin: [..., rot/2]``."""
    half = cos.shape[-1]
    if half == 0:
        return x
    rot = 2 * half
    c, s = cos.to(x.dtype), sin.to(x.dtype)
    xr, xp = x[..., :rot], x[..., rot:]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], -1).flatten(-2)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    return out if xp.shape[-1] == 0 else torch.cat([out, xp.expand(*out.shape[:-1], xp.shape[-1])], -1)


def _turns(delta: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of ``delta[..., None] * freqs`` (``[..., rot/2]``), computed in float64 once per distinct
    ``delta`` (a block's entries share few: a recalled chunk's tokens, a query's sinks move together)."""
    u, inv = torch.unique(delta, return_inverse=True)
    a = u.to(torch.float64)[:, None] * freqs.to(torch.float64)  # (U, rot/2) exact angles
    return torch.cos(a)[inv], torch.sin(a)[inv]


def _gather(pool: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``pool: [B, G, P, d]``, ``idx: [B, G, t, M]`` (>= 0) -> ``[B, G, t, M, d]``."""
    B, G, t, M = idx.shape
    d = pool.shape[-1]
    flat = idx.reshape(B, G, t * M, 1).expand(B, G, t * M, d)
    return torch.gather(pool, 2, flat).view(B, G, t, M, d)


def _scores(q, k, v, idx, delta, freqs, scale, interleaved, run, t0, t1):
    """One block of queries ``t0:t1``: ``(qq [B, G, rep, tb, d], kk, vv [B, G, tb, M, d], s [B, G, rep, tb, M],
    off [B, G, tb, M], turn)``; ``kk`` as gathered (rotated by ``turn`` when the keys are turned, see below)."""
    B, H, _, d = q.shape
    G = k.shape[1]
    rep = H // G
    acc = acc_dtype(q)
    ix = idx[:, :, t0:t1]  # (B, G, tb, M)
    tb, M = ix.shape[2], ix.shape[3]
    off = ix < 0
    safe = ix.clamp_min(0)
    kk = _gather(k, safe).to(acc)  # (B, G, tb, M, d)
    vv = _gather(v, safe).to(acc)
    qq = q[:, :, t0:t1].reshape(B, G, rep, tb, d).to(acc)
    turn = None
    if freqs.numel() == 0:
        s = torch.einsum("bgrtd,bgtmd->bgrtm", qq, kk)
    elif run > 1:  # one angle per run of entries: turn the query back instead of every key (q . Rk = R^T q . k)
        a = delta[:, :, t0:t1, ::run].to(torch.float64)[..., None] * freqs.to(torch.float64)  # (B, G, tb, Mr, h)
        turn = (torch.cos(a).to(acc), torch.sin(a).to(acc))
        qr = rotate_cs(qq[:, :, :, :, None, :], turn[0][:, :, None], -turn[1][:, :, None], interleaved)
        kr = kk.view(B, G, tb, M // run, run, d)
        s = torch.einsum("bgrtnd,bgtncd->bgrtnc", qr, kr).reshape(B, G, rep, tb, M)
    else:
        kk = rotate_cs(kk, *(t.to(acc) for t in _turns(delta[:, :, t0:t1], freqs)), interleaved)
        s = torch.einsum("bgrtd,bgtmd->bgrtm", qq, kk)
    s = (s * scale).masked_fill(off[:, :, None], -torch.inf)
    return qq, kk, vv, s, off, turn


def reference_bounded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    delta: torch.Tensor,
    freqs: torch.Tensor,
    scale: float,
    interleaved: bool,
    run: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch definition of ``mka::bounded_attention`` (differentiable in ``q, k, v``; its signature is the
    op's), in blocks of queries."""
    B, H, T, d = q.shape
    acc = acc_dtype(q)
    outs, lses = [], []
    for t0 in range(0, T, BLOCK_T):
        t1 = min(T, t0 + BLOCK_T)
        _, _, vv, s, _, _ = _scores(q, k, v, idx, delta, freqs, scale, interleaved, run, t0, t1)
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        den = p.sum(-1, keepdim=True)
        some = den > 0
        o = torch.einsum("bgrtm,bgtmd->bgrtd", p, vv) / torch.where(some, den, torch.ones_like(den))
        lse = torch.where(some, m + torch.log(torch.where(some, den, torch.ones_like(den))), -torch.inf)
        outs.append(o.reshape(B, H, t1 - t0, d))
        lses.append(lse.reshape(B, H, t1 - t0))
    out = torch.cat(outs, 2) if outs else q.new_zeros(q.shape, dtype=acc)
    lse = torch.cat(lses, 2) if lses else q.new_zeros((B, H, T), dtype=acc)
    return out.to(q.dtype), lse.to(acc)


def check_bounded_attention(q, k, v, idx, delta, freqs, scale, interleaved, run: int = 1) -> None:
    check.rank("q", q, 4, "[B, H, T, d]")
    check.floating("q", q)
    B, H, T, d = q.shape
    check.rank("k", k, 4, "[B, Hkv, P, d]")
    G, P = k.shape[1], k.shape[2]
    check.shape("k", k, (B, G, P, d), "[B, Hkv, P, d]")
    check.shape("v", v, (B, G, P, d), "[B, Hkv, P, d] like k")
    check.same_dtype("q", q, k=k, v=v)
    check.same_device("q", q, k=k, v=v, idx=idx, delta=delta, freqs=freqs)
    if G == 0 or H % G:
        raise ValueError(f"q has {H} heads, which must be a multiple of k's {G} kv heads")
    check.rank("idx", idx, 4, "[B, Hkv, T, M]")
    check.shape("idx", idx, (B, G, T, idx.shape[3]), "[B, Hkv, T, M]")
    check.dtype("idx", idx, torch.int64)
    check.shape("delta", delta, idx.shape, "[B, Hkv, T, M] like idx")
    check.dtype("delta", delta, torch.int64)
    check.rank("freqs", freqs, 1, "[rot / 2]")
    check.dtype("freqs", freqs, torch.float32)
    if 2 * freqs.numel() > d:
        raise ValueError(f"freqs has {freqs.numel()} frequencies, more than head size {d} allows (d / 2)")
    if not (isinstance(scale, float) and scale > 0):
        raise ValueError(f"scale must be a positive float, got {scale!r}")
    if not (isinstance(run, int) and run >= 1 and idx.shape[3] % run == 0):
        raise ValueError(f"run must be a positive int dividing the {idx.shape[3]} entries per query, got {run!r}")


def reference_bounded_attention_backward(
    grad_out, grad_lse, q, k, v, idx, delta, freqs, scale: float, interleaved: bool, run: int = 1
):
    """``(dq, dk, dv)`` of ``sum(grad_out * out) + sum(grad_lse * lse)``: the softmax-attention gradients per block
    of queries; a gathered key's gradient is rotated back by its angle (a rotation's transpose is its inverse) and
    summed into its pool entry (``scatter_add``)."""
    B, H, T, d = q.shape
    G = k.shape[1]
    rep = H // G
    acc = acc_dtype(q)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    M = idx.shape[3]
    for t0 in range(0, T, BLOCK_T):
        t1 = min(T, t0 + BLOCK_T)
        tb = t1 - t0
        qq, kk, vv, s, off, turn = _scores(q, k, v, idx, delta, freqs, scale, interleaved, run, t0, t1)
        go = grad_out[:, :, t0:t1].reshape(B, G, rep, tb, d).to(acc)
        gl = grad_lse[:, :, t0:t1].reshape(B, G, rep, tb, 1).to(acc)
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        den = p.sum(-1, keepdim=True)
        p = p / torch.where(den > 0, den, torch.ones_like(den))  # (B, G, rep, tb, M)
        dp = torch.einsum("bgrtd,bgtmd->bgrtm", go, vv)
        ds = p * (dp - (p * dp).sum(-1, keepdim=True) + gl) * scale  # d lse / d s = p
        dvv = torch.einsum("bgrtm,bgrtd->bgtmd", p, go)
        if turn is not None:  # s = (R^T q) . k per run: dq = R (sum ds k), dk = ds R^T q
            dsr = ds.view(B, G, rep, tb, M // run, run)
            kr = kk.view(B, G, tb, M // run, run, d)
            dqr = torch.einsum("bgrtnc,bgtncd->bgrtnd", dsr, kr)
            dq_blk = rotate_cs(dqr, turn[0][:, :, None], turn[1][:, :, None], interleaved).sum(4)
            qr = rotate_cs(qq[:, :, :, :, None, :], turn[0][:, :, None], -turn[1][:, :, None], interleaved)
            dkk = torch.einsum("bgrtnc,bgrtnd->bgtncd", dsr, qr).reshape(B, G, tb, M, d)
        else:
            dq_blk = torch.einsum("bgrtm,bgtmd->bgrtd", ds, kk)
            dkk = torch.einsum("bgrtm,bgrtd->bgtmd", ds, qq)
            if freqs.numel():
                c, sn = (t.to(acc) for t in _turns(delta[:, :, t0:t1], freqs))
                dkk = rotate_cs(dkk, c, -sn, interleaved)  # rotate back
        dq[:, :, t0:t1] = dq_blk.reshape(B, H, tb, d)
        keep = (~off)[..., None].to(acc)
        flat = idx[:, :, t0:t1].clamp_min(0).reshape(B, G, tb * M, 1).expand(-1, -1, -1, d)
        dk.scatter_add_(2, flat, (dkk * keep).reshape(B, G, -1, d))
        dv.scatter_add_(2, flat, (dvv * keep).reshape(B, G, -1, d))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


BOUNDED_ATTENTION = declare(
    "mka::bounded_attention",
    reference_bounded_attention,
    check=check_bounded_attention,
    fake=lambda q, *rest: (new_like(q), q.new_empty(q.shape[:3], dtype=acc_dtype(q))),
    backward=Backward(reference_bounded_attention_backward, outputs=("out", "lse"), wrt=("q", "k", "v")),
)


def bounded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    delta: torch.Tensor | None = None,
    freqs: torch.Tensor | None = None,
    scale: float | None = None,
    interleaved: bool = False,
    run: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mka::bounded_attention``; see the module docstring. ``delta`` None: zeros; ``freqs`` None: no rotation;
    ``scale`` None: ``d ** -0.5``; ``run``: the entries come in aligned runs of ``run`` that share one ``delta``
    (a recalled chunk's tokens), which lets an implementation turn the query once per run instead of every key.
    Returns ``(out, lse)``."""
    if delta is None:
        delta = torch.zeros_like(idx)
    if freqs is None:
        freqs = torch.zeros(0, dtype=torch.float32, device=q.device)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    fr = freqs.to(torch.float32)
    return torch.ops.mka.bounded_attention(q, k, v, idx, delta, fr, scale, bool(interleaved), int(run))
