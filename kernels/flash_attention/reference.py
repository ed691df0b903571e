"""The torch reference of ``mka::flash_attention`` (forward and backward): exact attention computed over blocks of
``Q_BLOCK`` query rows, so memory stays O(Q_BLOCK x Tk) per head. Every device without Triton runs it, and the
Triton kernels are tested against it."""

from __future__ import annotations

import torch

from .._dtypes import acc_dtype as _acc_dtype

Q_BLOCK = 256  # query rows per step of the reference (memory O(Q_BLOCK x Tk) per head)
HIDDEN_BIAS = -1.0e4  # additive-mask values at or below it hide the key exactly as -inf does


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------- reference


def _block_scores(
    qg: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, rows: slice, tq: int, scale: float, causal: bool
) -> torch.Tensor:
    """Scores of the query rows ``rows``: ``qg [B, Hkv, rep, tb, d]``, ``k [B, Hkv, Tk, d]`` (accumulation
    dtype) -> ``[B, Hkv, rep, tb, Tk]`` with -inf where masked."""
    B, Hkv, rep, tb, _ = qg.shape
    tk = k.shape[2]
    s = torch.matmul(qg, k.transpose(-1, -2)[:, :, None]) * scale  # (B, Hkv, rep, tb, Tk)
    if mask is not None:
        m = mask[:, :, rows]  # (B|1, H|1, tb, Tk)
        if m.shape[1] == Hkv * rep:
            m = m.reshape(m.shape[0], Hkv, rep, tb, tk)  # (B|1, Hkv, rep, tb, Tk)
        else:
            m = m[:, :, None]  # (B|1, 1, 1, tb, Tk)
        if m.dtype == torch.bool:
            s = s.masked_fill(~m, -torch.inf)
        else:
            m = m.to(s.dtype)
            s = s + m.masked_fill(m <= HIDDEN_BIAS, -torch.inf)
    if causal:
        i = torch.arange(rows.start, rows.stop, device=s.device)[:, None] + (tk - tq)
        j = torch.arange(tk, device=s.device)[None, :]
        s = s.masked_fill(j > i, -torch.inf)
    return s


def _grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q`` as ``[B, Hkv, rep, Tq, d]`` (the query heads sharing a kv head side by side), ``k`` and ``v``, all in
    the accumulation dtype."""
    B, H, Tq, d = q.shape
    Hkv = k.shape[1]
    acc = _acc_dtype(q)
    return q.to(acc).reshape(B, Hkv, H // Hkv, Tq, d), k.to(acc), v.to(acc)


def _softmax_parts(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``exp(s - m)``, its row sum ``l`` and the row max ``m`` (0 for a row with no visible key, so the
    exponentials stay finite and such a row gets ``l = 0``). ``m`` is detached: the results do not
    depend on it."""
    m = s.detach().amax(-1, keepdim=True)
    m = m.masked_fill(m == -torch.inf, 0.0)
    p = torch.exp(s - m)
    return p, p.sum(-1, keepdim=True), m


def reference_flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch definition of ``mka::flash_attention`` (see the module docstring): ``(out, lse)``.

    Differentiable by autograd (the tests compare the kernels' gradients with it)."""
    B, H, Tq, d = q.shape
    qg, kk, vv = _grouped(q, k, v)  # (B, Hkv, rep, Tq, d), k, v
    out = q.new_empty(qg.shape)
    lse = q.new_empty(qg.shape[:-1], dtype=_lse_dtype(q))
    for t0 in range(0, Tq, Q_BLOCK):
        rows = slice(t0, min(Tq, t0 + Q_BLOCK))
        s = _block_scores(qg[:, :, :, rows], kk, mask, rows, Tq, scale, causal)  # (B, Hkv, rep, tb, Tk)
        p, denom, m = _softmax_parts(s)
        seen = denom > 0
        l_safe = torch.where(seen, denom, 1.0)
        out[:, :, :, rows] = (torch.matmul(p, vv[:, :, None]) / l_safe).to(q.dtype)  # (B, Hkv, rep, tb, d)
        lse[:, :, :, rows] = torch.where(seen, m + torch.log(l_safe), -torch.inf).squeeze(-1).to(lse.dtype)
    return out.reshape(B, H, Tq, d), lse.reshape(B, H, Tq)


def reference_flash_attention_backward(
    grad_out, grad_lse, q, k, v, mask, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adjoint of :func:`reference_flash_attention` (its arguments, after ``grad_out`` like ``out`` and ``grad_lse``
    like ``lse`` or None): ``(dq, dk, dv)``, recomputing P per query block."""
    B, H, Tq, d = q.shape
    qg, kk, vv = _grouped(q, k, v)  # (B, Hkv, rep, Tq, d), k, v
    acc = qg.dtype
    go = grad_out.to(acc).reshape(qg.shape)
    gl = None if grad_lse is None else grad_lse.to(acc).reshape(*qg.shape[:-1], 1)
    dq = torch.empty(qg.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)  # (B, Hkv, Tk, d)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    for t0 in range(0, Tq, Q_BLOCK):
        rows = slice(t0, min(Tq, t0 + Q_BLOCK))
        s = _block_scores(qg[:, :, :, rows], kk, mask, rows, Tq, scale, causal)  # (B, Hkv, rep, tb, Tk)
        p, denom, _ = _softmax_parts(s)
        p = p / torch.where(denom > 0, denom, 1.0)  # P; rows with no visible key are all zero
        g = go[:, :, :, rows]  # (B, Hkv, rep, tb, d)
        delta = (g * torch.matmul(p, vv[:, :, None])).sum(-1, keepdim=True)  # (B, Hkv, rep, tb, 1)
        if gl is not None:
            delta = delta - gl[:, :, :, rows]
        dv += torch.einsum("bgrts,bgrtd->bgsd", p, g)
        dp = torch.matmul(g, vv.transpose(-1, -2)[:, :, None])  # (B, Hkv, rep, tb, Tk)
        ds = p * (dp - delta)
        dq[:, :, :, rows] = torch.matmul(ds, kk[:, :, None]) * scale
        dk += torch.einsum("bgrts,bgrtd->bgsd", ds, qg[:, :, :, rows]) * scale
    return dq.reshape(B, H, Tq, d).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
