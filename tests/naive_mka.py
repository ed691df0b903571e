"""Naive per-definition MKA (loops over batch and time, float64): what the ops and layers must match.

Written from DESIGN.md §1 directly, sharing no code with the package: only the layer's parameters.
"""

from __future__ import annotations

import math

import torch


def naive_ema(k: torch.Tensor, valid: torch.Tensor, beta: float, state=None, n_seen=None) -> torch.Tensor:
    """``k: [B, H, T, d]`` -> ``[B, H, T, d]`` float64; first real token initialises the state."""
    B, H, T, d = k.shape
    out = torch.zeros(B, H, T, d, dtype=torch.float64)
    for b in range(B):
        s = None if state is None else state[b].double()
        n = 0 if n_seen is None else int(n_seen[b])
        for t in range(T):
            if valid[b, t]:
                kt = k[b, :, t].double()
                s = kt if n == 0 else beta * s + (1 - beta) * kt
                n += 1
            out[b, :, t] = s if s is not None else 0.0
    return out


def _rope(x: torch.Tensor, p: int, base: float) -> torch.Tensor:
    d = x.shape[-1]
    out = torch.empty_like(x)
    for i in range(d // 2):
        ang = p * base ** (-2 * i / d)
        c, s = math.cos(ang), math.sin(ang)
        out[..., i] = x[..., i] * c - x[..., i + d // 2] * s
        out[..., i + d // 2] = x[..., i + d // 2] * c + x[..., i] * s
    return out


def _softmax_attend(q: torch.Tensor, keys: list[torch.Tensor], vals: list[torch.Tensor], scale: float):
    if not keys:
        return torch.zeros_like(q)
    s = torch.stack([q @ k for k in keys]) * scale
    p = torch.softmax(s, 0)
    return sum(pi * v for pi, v in zip(p, vals))


def naive_layer(layer, x: torch.Tensor, valid: torch.Tensor | None = None, bank=None) -> torch.Tensor:
    """Output of ``layer`` (FastMKAAttention or MKAAttention, float64) by the definition; pads -> 0."""
    cfg = layer.config
    B, T, _ = x.shape
    H, Hkv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    rep = H // Hkv
    valid = torch.ones(B, T, dtype=torch.bool) if valid is None else valid
    base = None if layer.rotary is None else layer.rotary.base
    rot = (lambda t, p: t) if base is None else (lambda t, p: _rope(t, p, base))
    scale = d**-0.5
    scale3 = cfg.recall_scale or scale
    C, R, beta = cfg.chunk_size, cfg.top_r, cfg.ema_beta
    L = len(cfg.levels)
    G = Hkv if cfg.router_per_head else 1
    gate = min(abs(float(layer.gate.detach())), 1.0)  # the reflecting gate: min(|gate|, 1)
    out = torch.zeros(B, T, layer.hidden_size, dtype=torch.float64)
    for b in range(B):
        ema_k = ema_v = None
        chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
        cur_k: list[torch.Tensor] = []
        cur_v: list[torch.Tensor] = []
        past: list[tuple[torch.Tensor, ...]] = []
        p = 0
        for t in range(T):
            if not valid[b, t]:
                continue
            xt = x[b, t]
            qf = layer.q_proj(xt)
            q = qf.view(H, d)
            k1 = layer.k_proj(xt).view(Hkv, d)
            v1 = layer.v_proj(xt).view(Hkv, d)
            ema_k = k1 if p == 0 else beta * ema_k + (1 - beta) * k1
            ema_v = v1 if p == 0 else beta * ema_v + (1 - beta) * v1
            cur_k.append(k1)
            cur_v.append(v1)
            if len(cur_k) == C:
                chunks.append((torch.stack(cur_k).mean(0), torch.stack(cur_v).mean(0)))
                cur_k, cur_v = [], []
            avail = chunks[: p // C]
            # L3 recall per kv head, with the group-mean query
            rec = []  # per kv head: list of (key, value, weight)
            for g in range(Hkv):
                qr = q[g * rep : (g + 1) * rep].mean(0)
                cands = [(ck[g], cv[g]) for ck, cv in avail]
                if bank is not None:
                    bk, bv = bank[0], bank[1]
                    bvalid = bank[2] if len(bank) > 2 else torch.ones(B, bk.shape[2], dtype=torch.bool)
                    cands += [(bk[b, g, m].double(), bv[b, g, m].double()) for m in range(bk.shape[2]) if bvalid[b, m]]
                scores = [float(qr @ ck) for ck, _ in cands]
                order = sorted(range(len(cands)), key=lambda i: -scores[i])[:R]
                if order:
                    w = torch.softmax(torch.tensor([scores[i] * scale3 for i in order], dtype=torch.float64), 0)
                    rec.append([(cands[i][0], cands[i][1], w[j]) for j, i in enumerate(order)])
                else:
                    rec.append([])
            has_recall = bool(rec[0])
            logits = layer.router(qf).view(G, L)
            if cfg.uses_longterm and not has_recall:
                logits = logits.clone()
                logits[:, L - 1] = -math.inf
            lam = torch.softmax(logits, -1)
            onehot = torch.zeros(L, dtype=torch.float64)
            onehot[0] = 1
            lam = onehot + gate * (lam - onehot)  # (G, L)
            head_out = torch.zeros(H, d, dtype=torch.float64)
            if layer.mode == "fastmka":
                kf = torch.zeros(Hkv, d, dtype=torch.float64)
                vf = torch.zeros(Hkv, d, dtype=torch.float64)
                for g in range(Hkv):
                    lv = lam[g if G > 1 else 0]
                    levels_k, levels_v = [k1[g]], [v1[g]]
                    if cfg.uses_session:
                        levels_k.append(ema_k[g])
                        levels_v.append(ema_v[g])
                    if cfg.uses_longterm:
                        levels_k.append(sum((w * kk for kk, _, w in rec[g]), torch.zeros(d, dtype=torch.float64)))
                        levels_v.append(sum((w * vv for _, vv, w in rec[g]), torch.zeros(d, dtype=torch.float64)))
                    kf[g] = sum(lv[i] * levels_k[i] for i in range(L))
                    vf[g] = sum(lv[i] * levels_v[i] for i in range(L))
                past.append((rot(kf, p), vf))
                qrot = rot(q, p)
                for h in range(H):
                    g = h // rep
                    head_out[h] = _softmax_attend(qrot[h], [e[0][g] for e in past], [e[1][g] for e in past], scale)
            else:
                past.append((rot(k1, p), v1, rot(ema_k, p), ema_v))
                qrot = rot(q, p)
                for h in range(H):
                    g = h // rep
                    lv = lam[g if G > 1 else 0]
                    o = lv[0] * _softmax_attend(qrot[h], [e[0][g] for e in past], [e[1][g] for e in past], scale)
                    i = 1
                    if cfg.uses_session:
                        o = o + lv[i] * _softmax_attend(
                            qrot[h], [e[2][g] for e in past], [e[3][g] for e in past], scale
                        )
                        i += 1
                    if cfg.uses_longterm and rec[g]:
                        o = o + lv[i] * _softmax_attend(
                            q[h], [kk for kk, _, _ in rec[g]], [vv for _, vv, _ in rec[g]], scale
                        )
                    head_out[h] = o
            out[b, t] = layer.o_proj(head_out.reshape(-1))
            p += 1
    return out


def plain_attention(q, k, v, causal: bool, scale: float, kv_valid=None) -> torch.Tensor:
    """Reference attention for one level: ``q: [B, H, Tq, d]``, ``k, v: [B, Hkv, Tk, d]`` (float64)."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, 1).double()
    v = v.repeat_interleave(rep, 1).double()
    s = q.double() @ k.transpose(-1, -2) * scale
    Tq, Tk = q.shape[2], k.shape[2]
    vis = torch.ones(Tq, Tk, dtype=torch.bool)
    if causal:
        vis = torch.arange(Tk)[None, :] <= torch.arange(Tq)[:, None] + (Tk - Tq)
    vis = vis[None, None].expand(q.shape[0], 1, Tq, Tk)
    if kv_valid is not None:
        vis = vis & kv_valid[:, None, None, :]
    s = s.masked_fill(~vis, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


__all__ = ["naive_ema", "naive_layer", "plain_attention"]
