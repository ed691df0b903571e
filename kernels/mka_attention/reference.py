"""MKA multi-level attention: ``out_t = sum_l lam_tl * Attn(q_t, K_l, V_l)``.

Levels: the full-length levels (L1 local keys/values and L2 session EMA keys/values: causal attention
over the whole cache) and, when ``R > 0``, L3: attention over the R entries each query recalled.

Shapes::

    q:        [B, H, Tq, d]       rotated query (for the full-length levels)
    ks, vs:   Lf x [B, Hkv, Tk, d] full-length levels, the cache included (rotated keys)
    lam:      [B, G, Tq, L]       routing weights, G in {1, Hkv}, L = Lf + (R > 0)
    q3:       [B, H, Tq, d]       query for L3 (un-rotated: recalled summaries carry no position)
    mem_k,
    mem_v:    [B, Hkv, S, d]      L3 memory table (chunk summaries, then bank entries)
    idx3:     [B, Hkv, Tq, R]     slots each query recalled (``mka::recall_select``); R = 0: no L3
    found3:   [B, Hkv, Tq, R]     which recalled entries exist
    kv_valid: [B, Tk]             False for padded keys
    out:      [B, H, Tq, d]       in the dtype of q

Queries are the last Tq positions of the Tk keys (a key offset of ``Tk - Tq`` for cached decode);
``causal`` lets query i see keys ``j <= i + Tk - Tq``. GQA shares each kv head with ``H / Hkv`` query
heads without repeating K/V. A query with no visible key gets zeros from that level.

The reference computes each full-length level with PyTorch's flash-style CPU attention on the shared
query (no explicit Tq x Tk matrix per level; one call per level, so the query is not copied into a
level-stacked batch, which cost more on the CPU than the batching saved) and merges levels by
their routing weights, which equals the log-sum-exp merge ``sum_l lam_l * exp(lse_l - lse) ...`` a
fused kernel performs. Half-precision inputs are computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _validate as check
from .._dtypes import acc_dtype as _acc_dtype
from .._grads import new_like
from ..declare import Backward, declare
from ..longterm.reference import recall_mask, recall_probs


def visibility(kv_valid: torch.Tensor, tq: int, causal: bool) -> torch.Tensor:
    """``[B, 1, Tq, Tk]`` bool: which keys each query sees (bottom-right causal alignment)."""
    tk = kv_valid.shape[1]
    vis = kv_valid[:, None, None, :].expand(-1, 1, tq, tk)
    if causal:
        i = torch.arange(tq, device=kv_valid.device)[:, None] + (tk - tq)
        j = torch.arange(tk, device=kv_valid.device)[None, :]
        vis = vis & (j <= i)
    return vis


def reference_mka_attention(
    q: torch.Tensor,
    ks: list[torch.Tensor],
    vs: list[torch.Tensor],
    lam: torch.Tensor,
    q3: torch.Tensor,
    mem_k: torch.Tensor,
    mem_v: torch.Tensor,
    idx3: torch.Tensor,
    found3: torch.Tensor,
    kv_valid: torch.Tensor,
    scale: float,
    causal: bool,
) -> torch.Tensor:
    """Pure-torch definition of ``mka::mka_attention`` (its signature is the op's; see the module docstring)."""
    B, H, Tq, d = q.shape
    Hkv, Tk = ks[0].shape[1], ks[0].shape[2]
    rep = H // Hkv
    nf = len(ks)
    acc = _acc_dtype(q)
    w = lam.to(acc)
    w = w.view(B, w.shape[1], 1, Tq, w.shape[-1])  # (B, G, 1, Tq, L): broadcasts over the group
    qa = q.to(acc)
    empty, mask = None, None  # (B, 1, Tq, 1): queries that see no key; none when every query sees itself
    if not (causal and Tq == Tk and bool(kv_valid.all())):
        vis = visibility(kv_valid, Tq, causal)  # (B, 1, Tq, Tk)
        empty = ~vis.any(-1, keepdim=True)
        mask = vis | empty
    out = None
    for i in range(nf):  # one attention per full-length level on the shared query (no stacked copies of it)
        o = F.scaled_dot_product_attention(
            qa, ks[i].to(acc), vs[i].to(acc), attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=rep > 1
        ).view(B, Hkv, rep, Tq, d)
        out = w[..., 0, None] * o if out is None else out.addcmul_(w[..., i, None], o)  # (B, Hkv, rep, Tq, d)
    if empty is not None:
        out = out.masked_fill(empty.view(B, 1, 1, Tq, 1), 0.0)
    if idx3.shape[3] > 0:
        sel = recall_mask(idx3, found3, mem_k.shape[2])  # (B, Hkv, Tq, S)
        p3 = recall_probs(q3.view(B, Hkv, rep, Tq, d), mem_k.to(acc), sel, scale)  # (B, Hkv, rep, Tq, S)
        out.addcmul_(w[..., nf, None], p3 @ mem_v.to(acc)[:, :, None])
    return out.reshape(B, H, Tq, d).to(q.dtype)


def check_mka_attention(q, ks, vs, lam, q3, mem_k, mem_v, idx3, found3, kv_valid, scale, causal) -> None:
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
    check.rank("mem_k", mem_k, 4, "[B, Hkv, S, d]")
    check.shape("mem_k", mem_k, (B, Hkv, mem_k.shape[2], d), "[B, Hkv, S, d]")
    check.shape("mem_v", mem_v, mem_k.shape, "[B, Hkv, S, d] like mem_k")
    check.floating("mem_k", mem_k)
    check.same_dtype("mem_k", mem_k, mem_v=mem_v)
    check.rank("idx3", idx3, 4, "[B, Hkv, Tq, R]")
    R = idx3.shape[3]
    check.shape("idx3", idx3, (B, Hkv, Tq, R), "[B, Hkv, Tq, R]")
    check.dtype("idx3", idx3, torch.int64)
    check.shape("found3", found3, (B, Hkv, Tq, R), "[B, Hkv, Tq, R] like idx3")
    check.dtype("found3", found3, torch.bool)
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
        mem_k=mem_k,
        mem_v=mem_v,
        idx3=idx3,
        found3=found3,
        kv_valid=kv_valid,
        **{f"ks[{i}]": k for i, k in enumerate(ks)},
        **{f"vs[{i}]": v for i, v in enumerate(vs)},
    )
    if not isinstance(scale, float) or not scale > 0:
        raise ValueError(f"scale must be a positive float, got {scale!r}")


BWD_Q_BLOCK = 256


def _reduce_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, Hkv, rep, Tq] -> [B, G, Tq]``: sum a per-head quantity over the heads of each routing group."""
    x = x.sum(2)
    return x.sum(1, keepdim=True) if groups == 1 else x


def reference_mka_attention_backward(grad_out, q, ks, vs, lam, q3, mem_k, mem_v, idx3, found3, kv_valid, scale, causal):
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
        kt, vt = k[:, :, None].transpose(-1, -2), v[:, :, None].transpose(-1, -2)  # (B, Hkv, 1, d, Tk)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        for t0 in range(0, Tq, BWD_Q_BLOCK):
            sl = slice(t0, min(Tq, t0 + BWD_Q_BLOCK))
            s = torch.matmul(qg[:, :, :, sl], kt) * scale  # (B, Hkv, rep, tb, Tk)
            p = torch.softmax(s.masked_fill(~allowed[:, :, :, sl], -torch.inf), -1)
            o = p @ v[:, :, None]
            g_o = go_full[:, :, :, sl]
            dlam[:, :, sl, lvl] = _reduce_groups((o * g_o).sum(-1), G)
            g_ol = w[:, :, :, sl, lvl, None] * g_o  # (B, Hkv, rep, tb, d)
            dv += torch.einsum("bgrts,bgrtd->bgsd", p, g_ol)
            dp = torch.matmul(g_ol, vt)
            ds = p * (dp - (dp * p).sum(-1, keepdim=True))
            dq[:, :, :, sl] += (ds @ k[:, :, None]) * scale
            dk += torch.einsum("bgrts,bgrtd->bgsd", ds, qg[:, :, :, sl]) * scale
        dks.append(dk.to(ks[lvl].dtype))
        dvs.append(dv.to(vs[lvl].dtype))
    dq3 = torch.zeros_like(q3)
    dmk, dmv = torch.zeros_like(mem_k), torch.zeros_like(mem_v)
    if idx3.shape[3] > 0:
        q3g = q3.to(acc).view(B, Hkv, rep, Tq, d)
        mk, mv = mem_k.to(acc), mem_v.to(acc)
        p3 = recall_probs(q3g, mk, recall_mask(idx3, found3, mem_k.shape[2]), scale)  # (B, Hkv, rep, Tq, S)
        o3 = p3 @ mv[:, :, None]
        dlam[..., nf] = _reduce_groups((o3 * go).sum(-1), G)
        g3 = w[..., nf, None] * go
        dmv = torch.einsum("bgrts,bgrtd->bgsd", p3, g3).to(mem_v.dtype)
        dp3 = torch.matmul(g3, mv[:, :, None].transpose(-1, -2))
        ds3 = p3 * (dp3 - (dp3 * p3).sum(-1, keepdim=True))
        dq3 = ((ds3 @ mk[:, :, None]) * scale).reshape(B, H, Tq, d).to(q3.dtype)
        dmk = (torch.einsum("bgrts,bgrtd->bgsd", ds3, q3g) * scale).to(mem_k.dtype)
    return dq.reshape(B, H, Tq, d).to(q.dtype), dks, dvs, dlam.to(lam.dtype), dq3, dmk, dmv


MKA_ATTENTION = declare(
    "mka::mka_attention",
    reference_mka_attention,
    check=check_mka_attention,
    fake=lambda q, *rest: new_like(q),
    backward=Backward(
        reference_mka_attention_backward,
        outputs=("out",),
        wrt=("q", "ks", "vs", "lam", "q3", "mem_k", "mem_v"),
    ),
)


def mka_attention(
    q: torch.Tensor,
    ks: list[torch.Tensor],
    vs: list[torch.Tensor],
    lam: torch.Tensor,
    *,
    q3: torch.Tensor | None = None,
    mem_k: torch.Tensor | None = None,
    mem_v: torch.Tensor | None = None,
    idx3: torch.Tensor | None = None,
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
    l3 = (mem_k, mem_v, idx3, found3)
    if all(t is None for t in l3):
        mem_k = mem_v = q.new_zeros(B, Hkv, 0, d)
        idx3 = torch.zeros(B, Hkv, Tq, 0, dtype=torch.int64, device=q.device)
        found3 = torch.zeros(B, Hkv, Tq, 0, dtype=torch.bool, device=q.device)
    elif any(t is None for t in l3):
        raise ValueError("pass all of mem_k, mem_v, idx3 and found3 for the long-term level, or none of them")
    if kv_valid is None:
        kv_valid = torch.ones(B, Tk, dtype=torch.bool, device=q.device)
    return torch.ops.mka.mka_attention(
        q,
        list(ks),
        list(vs),
        lam,
        q if q3 is None else q3,
        mem_k,
        mem_v,
        idx3,
        found3,
        kv_valid,
        float(d**-0.5 if scale is None else scale),
        bool(causal),
    )
