from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

from mka_compile.kernels import route_mix

F64 = torch.float64


def _inputs(G: int, L: int = 3, dtype=F64):
    B, H, T, d = 2, 3, 5, 4
    lam = torch.softmax(torch.randn(B, G, T, L, dtype=dtype), -1)
    ks = [torch.randn(B, H, T, d, dtype=dtype) for _ in range(L)]
    vs = [torch.randn(B, H, T, d, dtype=dtype) for _ in range(L)]
    return lam, ks, vs


@pytest.mark.parametrize("G", [1, 3])
def test_matches_definition(G: int) -> None:
    lam, ks, vs = _inputs(G)
    kf, vf = route_mix(lam, ks, vs)
    for b in range(2):
        for h in range(3):
            for t in range(5):
                w = lam[b, h if G > 1 else 0, t]
                torch.testing.assert_close(kf[b, h, t], sum(w[i] * ks[i][b, h, t] for i in range(3)))
                torch.testing.assert_close(vf[b, h, t], sum(w[i] * vs[i][b, h, t] for i in range(3)))


@pytest.mark.parametrize("G", [1, 3])
def test_gradcheck_and_opcheck(G: int) -> None:
    lam, ks, vs = _inputs(G)
    ins = [t.clone().requires_grad_() for t in (lam, *ks, *vs)]
    assert torch.autograd.gradcheck(lambda w, *kv: route_mix(w, list(kv[:3]), list(kv[3:])), ins)
    lam, ks, vs = _inputs(G, dtype=torch.float32)
    opcheck(torch.ops.mka.route_mix.default, (lam.requires_grad_(), ks, vs))


def test_bf16_accumulates_in_fp32() -> None:
    lam, ks, vs = _inputs(1, dtype=torch.float32)
    kf, _ = route_mix(lam.bfloat16(), [k.bfloat16() for k in ks], [v.bfloat16() for v in vs])
    ref, _ = route_mix(lam.bfloat16().float(), [k.bfloat16().float() for k in ks], [v.bfloat16().float() for v in vs])
    assert kf.dtype == torch.bfloat16
    torch.testing.assert_close(kf.float(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
    ("mutate", "name"),
    [
        (lambda lam, ks, vs: (lam[:, :, :, :2], ks, vs), "lam"),
        (lambda lam, ks, vs: (torch.cat([lam, lam], 1), ks, vs), "lam"),
        (lambda lam, ks, vs: (lam[:, :, :1], ks, vs), "lam"),
        (lambda lam, ks, vs: (lam, ks[:2], vs), "ks"),
        (lambda lam, ks, vs: (lam, [ks[0], ks[1], ks[2][:, :, :, :2]], vs), r"ks\[2\]"),
        (lambda lam, ks, vs: (lam, ks, [vs[0], vs[1].float(), vs[2]]), r"vs\[1\]"),
        (lambda lam, ks, vs: (lam, [ks[0], ks[1], ks[2].to("meta")], vs), r"ks\[2\]"),
    ],
)
def test_bad_input_names_the_argument(mutate, name: str) -> None:
    lam, ks, vs = mutate(*_inputs(1))
    with pytest.raises(ValueError, match=name):
        route_mix(lam, ks, vs)


def test_backward_opcheck() -> None:
    lam, ks, vs = _inputs(3, dtype=torch.float32)
    g = torch.randn_like(ks[0])
    opcheck(torch.ops.mka.route_mix_backward.default, (g, g.clone(), lam, ks, vs))
