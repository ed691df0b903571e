"""FastMKA route-mix: ``kf_t = sum_l lam_tl * k_l,t`` and ``vf_t`` likewise, for every kv head.

Shapes: ``lam: [B, G, T, L]`` with G = 1 (one routing shared by all heads) or G = Hkv (per kv head);
``ks, vs``: lists of L tensors ``[B, Hkv, T, d]`` (level order as in ``MKAConfig.levels``).
Returns ``kf, vf: [B, Hkv, T, d]`` in the dtype of ``ks[0]``; the sum is accumulated in float32
(float64 for float64 inputs).
"""

from __future__ import annotations

import torch

from . import _validate as check
from ._dtypes import acc_dtype as _acc_dtype
from ._grads import new_like
from .declare import Backward, declare


def reference_route_mix(
    lam: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch definition of ``mka::route_mix`` (its signature is the op's)."""
    acc = _acc_dtype(ks[0])
    w = lam.to(acc)[..., None]  # (B, G, T, L, 1)

    def mix(ts):
        out = w[..., 0, :] * ts[0].to(acc)  # a fresh buffer: the other levels accumulate into it
        for i in range(1, len(ts)):
            out.addcmul_(w[..., i, :], ts[i].to(acc))
        return out.to(ts[0].dtype)

    return mix(ks), mix(vs)


def check_route_mix(lam, ks, vs) -> None:
    if len(ks) == 0 or len(ks) != len(vs):
        raise ValueError(f"ks and vs must be lists of the same non-zero length, got {len(ks)} and {len(vs)}")
    check.rank("ks[0]", ks[0], 4, "[B, Hkv, T, d]")
    for i, (k, v) in enumerate(zip(ks, vs)):
        check.floating(f"ks[{i}]", k)
        check.shape(f"ks[{i}]", k, ks[0].shape, "[B, Hkv, T, d] like ks[0]")
        check.shape(f"vs[{i}]", v, ks[0].shape, "[B, Hkv, T, d] like ks[0]")
        check.same_dtype("ks[0]", ks[0], **{f"ks[{i}]": k, f"vs[{i}]": v})
        check.same_device("ks[0]", ks[0], **{f"ks[{i}]": k, f"vs[{i}]": v})
    B, H, T, _ = ks[0].shape
    check.rank("lam", lam, 4, "[B, G, T, L]")
    check.floating("lam", lam)
    if lam.shape[1] not in (1, H):
        raise ValueError(f"lam has {lam.shape[1]} routing groups; use G = 1 (shared) or G = Hkv = {H}")
    check.shape("lam", lam, (B, lam.shape[1], T, len(ks)), "[B, G, T, L] with L = len(ks)")
    check.same_device("ks[0]", ks[0], lam=lam)


def reference_route_mix_backward(grad_kf, grad_vf, lam, ks, vs):
    """``dk_l = lam_l * dkf``; ``dlam_l = sum(dkf * k_l + dvf * v_l)`` over d (and heads when G = 1)."""
    acc = _acc_dtype(ks[0])
    w = lam.to(acc)[..., None]  # (B, G, T, L, 1)
    gk, gv = grad_kf.to(acc), grad_vf.to(acc)
    dks = [(w[..., i, :] * gk).to(k.dtype) for i, k in enumerate(ks)]
    dvs = [(w[..., i, :] * gv).to(v.dtype) for i, v in enumerate(vs)]
    dlam = torch.stack([(gk * k.to(acc) + gv * v.to(acc)).sum(-1) for k, v in zip(ks, vs)], -1)  # (B, Hkv, T, L)
    dlam = dlam.sum(1, keepdim=True) if lam.shape[1] == 1 else dlam
    return dlam.to(lam.dtype), dks, dvs


ROUTE_MIX = declare(
    "mka::route_mix",
    reference_route_mix,
    check=check_route_mix,
    fake=lambda lam, ks, vs: (new_like(ks[0]), new_like(vs[0])),
    backward=Backward(reference_route_mix_backward, outputs=("kf", "vf"), wrt=("lam", "ks", "vs")),
)


def route_mix(lam: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``mka::route_mix``: ``(kf, vf) = (sum_l lam_l ks[l], sum_l lam_l vs[l])``; see the module docstring."""
    return torch.ops.mka.route_mix(lam, list(ks), list(vs))
