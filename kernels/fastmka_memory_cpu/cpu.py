"""The CPU kernels of ``mka::memory_mix`` / ``mka::memory_levels`` and the backward: calls into the C++ pass
(``extension.cpp``: one pass per (batch row, kv head) over the routing, the session EMA, the chunk summaries, the
causal top-R recall and the routed mix; float32). Arguments in the ops' order (see :mod:`.reference`)."""

from __future__ import annotations

import torch

from .build import extension


def _gate(gate: torch.Tensor) -> tuple[float, float]:
    """``(min(|gate|, 1), sign)``: the effective gate of the routing and its gradient (``+1`` at 0)."""
    raw = float(gate.detach().reshape(()))
    return min(abs(raw), 1.0), -1.0 if raw < 0 else 1.0


def _run(k1, v1, q, logits, gate, valid, n_seen, *rest, save: bool, mix: bool) -> list[torch.Tensor]:
    """The C++ forward: kf, vf, lam, router p, the 6 new state tensors, then (``save`` or not ``mix``) s_k, s_v
    ``[B, T, Hkv, d]``, [k3|v3] (``save``), the recalled slots, their weights and the recall queries."""
    *state, session, longterm, beta, chunk, top_r, scale = rest
    return extension().forward(
        k1.transpose(1, 2), v1.transpose(1, 2), q, logits, _gate(gate)[0], valid, n_seen, *state,
        session, longterm, beta, chunk, top_r, scale, save, mix,
    )  # fmt: skip


def forward(*args, mix: bool) -> tuple[torch.Tensor, ...]:
    """``mka::memory_mix`` (``mix``): ``kf, vf, lam, *state``; ``mka::memory_levels``: ``s_k, s_v, slots, lam,
    *state`` (all fresh tensors: the state is copied, never written in place)."""
    out = _run(*args, save=False, mix=mix)
    if mix:
        return out[0], out[1], out[2], *out[4:10]
    return out[10], out[11], out[13], out[2], *out[4:10]


def backward(grad_kf, grad_vf, grad_lam, k1, v1, q, logits, gate, valid, n_seen, *rest):
    """Gradients of ``k1, v1`` (``[B, T, Hkv, d]``), ``q``, ``logits`` and ``gate`` from those of ``kf, vf`` and
    ``lam`` (None: none): the forward again (with what the backward reads), then the C++ backward."""
    *_, session, longterm, beta, chunk, top_r, scale = rest
    out = _run(k1, v1, q, logits, gate, valid, n_seen, *rest, save=True, mix=True)
    lam, p, summ_k, summ_v = out[2], out[3], out[8], out[9]
    s_k, s_v, kv3, slots, weights, q_r = out[10:16]
    g, sign = _gate(gate)
    glam = grad_lam if grad_lam is not None else grad_kf.new_empty(0)
    gk1, gv1, gq, glogits, ggate = extension().backward(
        grad_kf, grad_vf, glam, k1.transpose(1, 2), v1.transpose(1, 2), q_r, q.shape[-1], g, valid, n_seen, lam, p,
        summ_k, summ_v, s_k, s_v, kv3, slots, weights, session, longterm, beta, chunk, top_r, scale,
    )  # fmt: skip
    return gk1, gv1, gq, glogits, ggate * sign
