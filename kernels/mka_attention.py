"""MKA multi-level attention: ``out_t = sum_l lam_tl * Attn(q_t, K_l, V_l)``.

Levels: the full-length levels (L1 local keys/values and L2 session EMA keys/values: causal attention
over the whole cache) and, when ``R > 0``, L3: attention over the R entries each query recalled.

Shapes::

    q:        [B, H, Tq, d]       rotated query (for the full-length levels)
    ks, vs:   Lf x [B, Hkv, Tk, d] full-length levels, the cache included (rotated keys)
    lam:      [B, G, Tq, L]       routing weights, G in {1, Hkv}, L = Lf + (R > 0)
    q3:       [B, H, Tq, d]       query for L3 (un-rotated: recalled summaries carry no position)
    k3, v3:   [B, Hkv, Tq, R, d]  recalled entries (R may be 0: no L3)
    found3:   [B, Hkv, Tq, R]     which recalled entries exist
    kv_valid: [B, Tk]             False for padded keys
    out:      [B, H, Tq, d]       in the dtype of q

Queries are the last Tq positions of the Tk keys (a key offset of ``Tk - Tq`` for cached decode);
``causal`` lets query i see keys ``j <= i + Tk - Tq``. GQA shares each kv head with ``H / Hkv`` query
heads without repeating K/V. A query with no visible key gets zeros from that level.

The reference computes the full-length levels in ONE attention call over a level-stacked batch
(shared query, flash-style CPU kernel, no explicit Tq x Tk matrix per level) and merges levels by
their routing weights, which equals the log-sum-exp merge ``sum_l lam_l * exp(lse_l - lse) ...`` a
fused kernel performs. Half-precision inputs are computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _validate as check
from ._grads import zeros_for_none


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def visibility(kv_valid: torch.Tensor, tq: int, causal: bool) -> torch.Tensor:
    """``[B, 1, Tq, Tk]`` bool: which keys each query sees (bottom-right causal alignment)."""
    tk = kv_valid.shape[1]
    vis = kv_valid[:, None, None, :].expand(-1, 1, tq, tk)
    if causal:
        i = torch.arange(tq, device=kv_valid.device)[:, None] + (tk - tq)
        j = torch.arange(tk, device=kv_valid.device)[None, :]
        vis = vis & (j <= i)
    return vis


def reference_mka_attention(q, ks, vs, lam, q3, k3, v3, found3, kv_valid, scale: float, causal: bool):
    """Pure-torch definition of ``mka::mka_attention`` (see the module docstring)."""
    B, H, Tq, d = q.shape
    Hkv, Tk = ks[0].shape[1], ks[0].shape[2]
    rep = H // Hkv
    nf = len(ks)
    acc = _acc_dtype(q)
    vis = visibility(kv_valid, Tq, causal)  # (B, 1, Tq, Tk)
    empty = ~vis.any(-1, keepdim=True)  # (B, 1, Tq, 1)
    qq = q.to(acc).repeat(nf, 1, 1, 1)  # (nf*B, H, Tq, d): one call for all full-length levels
    kk = torch.cat([k.to(acc) for k in ks], 0)  # (nf*B, Hkv, Tk, d)
    vv = torch.cat([v.to(acc) for v in vs], 0)
    if causal and Tq == Tk and bool(kv_valid.all()):
        o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale, enable_gqa=rep > 1)
    else:
        mask = (vis | empty).repeat(nf, 1, 1, 1)
        o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale, enable_gqa=rep > 1)
    o = o.view(nf, B, Hkv, rep, Tq, d)
    w = lam.to(acc)
    w = w.view(B, w.shape[1], 1, Tq, w.shape[-1])  # (B, G, 1, Tq, L): broadcasts over the group
    out = sum(w[..., i, None] * o[i] for i in range(nf))  # (B, Hkv, rep, Tq, d)
    out = out.masked_fill(empty.view(B, 1, 1, Tq, 1), 0.0)
    if k3.shape[3] > 0:
        qg = q3.to(acc).view(B, Hkv, rep, Tq, d)
        s3 = torch.einsum("bgrtd,bgtsd->bgrts", qg, k3.to(acc)) * scale  # (B, Hkv, rep, Tq, R)
        f3 = found3[:, :, None]  # (B, Hkv, 1, Tq, R)
        any3 = f3.any(-1, keepdim=True)
        p3 = torch.softmax(s3.masked_fill(~f3, -torch.inf).masked_fill(~any3, 0.0), -1)
        p3 = torch.where(f3, p3, torch.zeros_like(p3))
        o3 = torch.einsum("bgrts,bgtsd->bgrtd", p3, v3.to(acc))
        out = out + w[..., nf, None] * o3
    return out.reshape(B, H, Tq, d).to(q.dtype)


def check_mka_attention(q, ks, vs, lam, q3, k3, v3, found3, kv_valid, scale, causal) -> None:
    check.rank("q", q, 4, "[B, H, Tq, d]")
    check.floating("q", q)
    B, H, Tq, d = q.shape
    if len(ks) == 0 or len(ks) != len(vs):
        raise ValueError(f"ks and vs must be lists of the same non-zero length, got {len(ks)} and {len(vs)}")
    check.rank("ks[0]", ks[0], 4, "[B, Hkv, Tk, d]")
    Hkv, Tk = ks[0].shape[1], ks[0].shape[2]
    check.heads_divide(H, Hkv, "q", "ks[0]")
    for i, (k, v) in enumerate(zip(ks, vs)):
        check.shape(f"ks[{i}]", k, (B, Hkv, Tk, d), "[B, Hkv, Tk, d]")
        check.shape(f"vs[{i}]", v, (B, Hkv, Tk, d), "[B, Hkv, Tk, d]")
        check.same_dtype("q", q, **{f"ks[{i}]": k, f"vs[{i}]": v})
    if causal and Tq > Tk:
        raise ValueError(f"q has {Tq} positions but the keys only {Tk}; causal queries are the last Tq keys")
    check.shape("q3", q3, q.shape, "[B, H, Tq, d] like q")
    check.rank("k3", k3, 5, "[B, Hkv, Tq, R, d]")
    R = k3.shape[3]
    check.shape("k3", k3, (B, Hkv, Tq, R, d), "[B, Hkv, Tq, R, d]")
    check.shape("v3", v3, (B, Hkv, Tq, R, d), "[B, Hkv, Tq, R, d]")
    check.shape("found3", found3, (B, Hkv, Tq, R), "[B, Hkv, Tq, R]")
    check.dtype("found3", found3, torch.bool)
    check.same_dtype("k3", k3, v3=v3)
    check.floating("k3", k3)
    check.shape("kv_valid", kv_valid, (B, Tk), "[B, Tk]")
    check.dtype("kv_valid", kv_valid, torch.bool, " (True = real key)")
    check.rank("lam", lam, 4, "[B, G, Tq, L]")
    check.floating("lam", lam)
    L = len(ks) + (1 if R > 0 else 0)
    if lam.shape[1] not in (1, Hkv):
        raise ValueError(f"lam has {lam.shape[1]} routing groups; use G = 1 (shared) or G = Hkv = {Hkv}")
    check.shape("lam", lam, (B, lam.shape[1], Tq, L), f"[B, G, Tq, L] with L = {L} levels")
    check.same_device(
        "q",
        q,
        lam=lam,
        q3=q3,
        k3=k3,
        v3=v3,
        found3=found3,
        kv_valid=kv_valid,
        **{f"ks[{i}]": k for i, k in enumerate(ks)},
        **{f"vs[{i}]": v for i, v in enumerate(vs)},
    )
    if not isinstance(scale, float) or not scale > 0:
        raise ValueError(f"scale must be a positive float, got {scale!r}")


@torch.library.custom_op("mka::mka_attention", mutates_args=())
def _mka_attention_op(
    q: torch.Tensor,
    ks: list[torch.Tensor],
    vs: list[torch.Tensor],
    lam: torch.Tensor,
    q3: torch.Tensor,
    k3: torch.Tensor,
    v3: torch.Tensor,
    found3: torch.Tensor,
    kv_valid: torch.Tensor,
    scale: float,
    causal: bool,
) -> torch.Tensor:
    check_mka_attention(q, ks, vs, lam, q3, k3, v3, found3, kv_valid, scale, causal)
    return reference_mka_attention(q, ks, vs, lam, q3, k3, v3, found3, kv_valid, scale, causal)


@_mka_attention_op.register_fake
def _(q, ks, vs, lam, q3, k3, v3, found3, kv_valid, scale, causal):
    check_mka_attention(q, ks, vs, lam, q3, k3, v3, found3, kv_valid, scale, causal)
    return torch.empty_like(q)


BWD_Q_BLOCK = 256


def _reduce_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, Hkv, rep, Tq] -> [B, G, Tq]``: sum a per-head quantity over the heads of each routing group."""
    x = x.sum(2)
    return x.sum(1, keepdim=True) if groups == 1 else x


def reference_mka_attention_backward(grad_out, q, ks, vs, lam, q3, k3, v3, found3, kv_valid, scale, causal):
    """Adjoint of :func:`reference_mka_attention`, flash-style: per query block recompute
    ``P_l = softmax(S_l)``, then ``dV_l = P_l^T dO_l``, ``dS_l = P_l * (dP_l - rowsum(dP_l * P_l))`` with
    ``dO_l = lam_l dO`` and ``dlam_l = <O_l, dO>``. Memory is O(block x Tk) per level."""
    B, H, Tq, d = q.shape
    Hkv, Tk = ks[0].shape[1], ks[0].shape[2]
    rep, nf, G = H // Hkv, len(ks), lam.shape[1]
    acc = _acc_dtype(q)
    vis = visibility(kv_valid, Tq, causal)  # (B, 1, Tq, Tk)
    empty = ~vis.any(-1, keepdim=True)  # (B, 1, Tq, 1)
    allowed = (vis | empty).view(B, 1, 1, Tq, Tk)
    go = grad_out.to(acc).view(B, Hkv, rep, Tq, d)
    go_full = go.masked_fill(empty.view(B, 1, 1, Tq, 1), 0.0)  # full-length levels are zeroed on empty rows
    w = lam.to(acc).view(B, G, 1, Tq, lam.shape[-1])
    qg = q.to(acc).view(B, Hkv, rep, Tq, d)
    dq = torch.zeros_like(qg)
    dlam = torch.zeros(B, G, Tq, lam.shape[-1], dtype=acc, device=q.device)
    dks, dvs = [], []
    for lvl in range(nf):
        k, v = ks[lvl].to(acc), vs[lvl].to(acc)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        for t0 in range(0, Tq, BWD_Q_BLOCK):
            sl = slice(t0, min(Tq, t0 + BWD_Q_BLOCK))
            s = torch.einsum("bgrtd,bgsd->bgrts", qg[:, :, :, sl], k) * scale  # (B, Hkv, rep, tb, Tk)
            p = torch.softmax(s.masked_fill(~allowed[:, :, :, sl], -torch.inf), -1)
            o = torch.einsum("bgrts,bgsd->bgrtd", p, v)
            g_o = go_full[:, :, :, sl]
            dlam[:, :, sl, lvl] = _reduce_groups((o * g_o).sum(-1), G)
            g_ol = w[:, :, :, sl, lvl, None] * g_o  # (B, Hkv, rep, tb, d)
            dv += torch.einsum("bgrts,bgrtd->bgsd", p, g_ol)
            dp = torch.einsum("bgrtd,bgsd->bgrts", g_ol, v)
            ds = p * (dp - (dp * p).sum(-1, keepdim=True))
            dq[:, :, :, sl] += torch.einsum("bgrts,bgsd->bgrtd", ds, k) * scale
            dk += torch.einsum("bgrts,bgrtd->bgsd", ds, qg[:, :, :, sl]) * scale
        dks.append(dk.to(ks[lvl].dtype))
        dvs.append(dv.to(vs[lvl].dtype))
    dq3 = torch.zeros_like(q3)
    dk3, dv3 = torch.zeros_like(k3), torch.zeros_like(v3)
    if k3.shape[3] > 0:
        q3g = q3.to(acc).view(B, Hkv, rep, Tq, d)
        k3a, v3a = k3.to(acc), v3.to(acc)
        s3 = torch.einsum("bgrtd,bgtsd->bgrts", q3g, k3a) * scale
        f3 = found3[:, :, None]
        any3 = f3.any(-1, keepdim=True)
        p3 = torch.softmax(s3.masked_fill(~f3, -torch.inf).masked_fill(~any3, 0.0), -1)
        p3 = torch.where(f3, p3, torch.zeros_like(p3))
        o3 = torch.einsum("bgrts,bgtsd->bgrtd", p3, v3a)
        dlam[..., nf] = _reduce_groups((o3 * go).sum(-1), G)
        g3 = w[..., nf, None] * go
        dv3 = torch.einsum("bgrts,bgrtd->bgtsd", p3, g3).to(v3.dtype)
        dp3 = torch.einsum("bgrtd,bgtsd->bgrts", g3, v3a)
        ds3 = p3 * (dp3 - (dp3 * p3).sum(-1, keepdim=True))
        dq3 = (torch.einsum("bgrts,bgtsd->bgrtd", ds3, k3a) * scale).reshape(B, H, Tq, d).to(q3.dtype)
        dk3 = (torch.einsum("bgrts,bgrtd->bgtsd", ds3, q3g) * scale).to(k3.dtype)
    return dq.reshape(B, H, Tq, d).to(q.dtype), dks, dvs, dlam.to(lam.dtype), dq3, dk3, dv3


@torch.library.custom_op("mka::mka_attention_backward", mutates_args=())
def _mka_attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    ks: list[torch.Tensor],
    vs: list[torch.Tensor],
    lam: torch.Tensor,
    q3: torch.Tensor,
    k3: torch.Tensor,
    v3: torch.Tensor,
    found3: torch.Tensor,
    kv_valid: torch.Tensor,
    scale: float,
    causal: bool,
) -> tuple[
    torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    return reference_mka_attention_backward(grad_out, q, ks, vs, lam, q3, k3, v3, found3, kv_valid, scale, causal)


@_mka_attention_backward_op.register_fake
def _(grad_out, q, ks, vs, lam, q3, k3, v3, found3, kv_valid, scale, causal):
    e = torch.empty_like
    return e(q), [e(k) for k in ks], [e(v) for v in vs], e(lam), e(q3), e(k3), e(v3)


def _setup(ctx, inputs, output):
    q, ks, vs, lam, q3, k3, v3, found3, kv_valid, scale, causal = inputs
    ctx.n, ctx.scale, ctx.causal = len(ks), scale, causal
    ctx.save_for_backward(q, lam, q3, k3, v3, found3, kv_valid, *ks, *vs)


def _backward(ctx, grad_out):
    q, lam, q3, k3, v3, found3, kv_valid, *kv = ctx.saved_tensors
    ks, vs = list(kv[: ctx.n]), list(kv[ctx.n :])
    (g,) = zeros_for_none([grad_out], [q])
    gq, gks, gvs, glam, gq3, gk3, gv3 = torch.ops.mka.mka_attention_backward(
        g, q, ks, vs, lam, q3, k3, v3, found3, kv_valid, ctx.scale, ctx.causal
    )
    return gq, list(gks), list(gvs), glam, gq3, gk3, gv3, None, None, None, None


_mka_attention_op.register_autograd(_backward, setup_context=_setup)


def mka_attention(
    q: torch.Tensor,
    ks: list[torch.Tensor],
    vs: list[torch.Tensor],
    lam: torch.Tensor,
    *,
    q3: torch.Tensor | None = None,
    k3: torch.Tensor | None = None,
    v3: torch.Tensor | None = None,
    found3: torch.Tensor | None = None,
    kv_valid: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """``mka::mka_attention`` with defaults: no L3, every key valid, ``scale = d ** -0.5``."""
    check.rank("q", q, 4, "[B, H, Tq, d]")
    check.rank("ks[0]", ks[0], 4, "[B, Hkv, Tk, d]")
    B, H, Tq, d = q.shape
    Hkv, Tk = ks[0].shape[1], ks[0].shape[2]
    if k3 is None:
        k3 = q.new_zeros(B, Hkv, Tq, 0, d)
        v3 = q.new_zeros(B, Hkv, Tq, 0, d)
        found3 = torch.zeros(B, Hkv, Tq, 0, dtype=torch.bool, device=q.device)
    elif v3 is None or found3 is None:
        raise ValueError("k3 was given without v3 and found3; pass all three recalled tensors")
    if kv_valid is None:
        kv_valid = torch.ones(B, Tk, dtype=torch.bool, device=q.device)
    return torch.ops.mka.mka_attention(
        q,
        list(ks),
        list(vs),
        lam,
        q if q3 is None else q3,
        k3,
        v3,
        found3,
        kv_valid,
        float(d**-0.5 if scale is None else scale),
        bool(causal),
    )
