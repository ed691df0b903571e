from __future__ import annotations

import importlib

import pytest
import torch
from naive_mka import plain_attention
from torch.library import opcheck

from mka_compile.kernels import mka_attention

F64 = torch.float64


def _inputs(B=2, H=4, Hkv=2, Tq=6, Tk=9, d=4, R=3, G=1, S=5, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    q = r(B, H, Tq, d)
    ks = [r(B, Hkv, Tk, d) for _ in range(2)]
    vs = [r(B, Hkv, Tk, d) for _ in range(2)]
    L = 2 + (R > 0)
    lam = torch.softmax(r(B, G, Tq, L), -1)
    q3 = r(B, H, Tq, d)
    mem_k, mem_v = r(B, Hkv, S, d), r(B, Hkv, S, d)
    idx3 = torch.rand(B, Hkv, Tq, S, generator=g).argsort(-1)[..., :R]  # distinct slots per query
    found3 = torch.rand(B, Hkv, Tq, R, generator=g) > 0.4
    kv_valid = torch.rand(B, Tk, generator=g) > 0.2
    return q, ks, vs, lam, q3, mem_k, mem_v, idx3, found3, kv_valid


def _naive(q, ks, vs, lam, q3, mem_k, mem_v, idx3, found3, kv_valid, scale, causal):
    B, H, Tq, d = q.shape
    Hkv = ks[0].shape[1]
    rep = H // Hkv
    lamh = lam.repeat_interleave(rep, 1) if lam.shape[1] > 1 else lam.expand(B, H, Tq, lam.shape[-1])
    out = sum(lamh[..., i, None] * plain_attention(q, ks[i], vs[i], causal, scale, kv_valid) for i in range(2))
    if idx3.shape[3]:
        for b in range(B):
            for h in range(H):
                for t in range(Tq):
                    g = h // rep
                    slots = [int(i) for i, f in zip(idx3[b, g, t], found3[b, g, t]) if f]
                    if slots:
                        s = mem_k[b, g, slots].double() @ q3[b, h, t].double() * scale
                        out[b, h, t] += lamh[b, h, t, 2] * (torch.softmax(s, 0) @ mem_v[b, g, slots].double())
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("H", "Hkv", "G"), [(4, 4, 1), (4, 2, 1), (4, 2, 2), (3, 1, 1)])
@pytest.mark.parametrize("R", [0, 3])
def test_matches_per_level_definition(causal: bool, H: int, Hkv: int, G: int, R: int) -> None:
    args = _inputs(H=H, Hkv=Hkv, G=G, R=R)
    out = torch.ops.mka.mka_attention(*args, 0.4, causal)
    torch.testing.assert_close(out, _naive(*args, 0.4, causal), rtol=1e-10, atol=1e-10)


def test_fully_masked_rows_are_zero_not_nan() -> None:
    *args, kv_valid = _inputs(Tq=5, Tk=5, R=0, dtype=torch.float32)
    kv_valid[:] = True
    kv_valid[0, :3] = False  # left padding: the first 3 queries of row 0 see no key
    out = torch.ops.mka.mka_attention(*args, kv_valid, 0.5, True)
    assert torch.isfinite(out).all()
    assert out[0, :, :3].abs().sum() == 0
    out.sum().backward() if out.requires_grad else None


def test_decode_offset_equals_full() -> None:
    q, ks, vs, lam, q3, mem_k, mem_v, idx3, found3, _ = _inputs(Tq=9, Tk=9, R=3)
    valid = torch.ones(2, 9, dtype=torch.bool)
    full = torch.ops.mka.mka_attention(q, ks, vs, lam, q3, mem_k, mem_v, idx3, found3, valid, 0.5, True)
    for t in range(9):
        s = slice(t, t + 1)
        step = torch.ops.mka.mka_attention(
            q[:, :, s],
            [k[:, :, : t + 1] for k in ks],
            [v[:, :, : t + 1] for v in vs],
            lam[:, :, s],
            q3[:, :, s],
            mem_k,
            mem_v,
            idx3[:, :, s],
            found3[:, :, s],
            valid[:, : t + 1],
            0.5,
            True,
        )
        torch.testing.assert_close(step, full[:, :, s])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("G", [1, 2])
def test_gradcheck_fp64(causal: bool, G: int) -> None:
    q, ks, vs, lam, q3, mem_k, mem_v, idx3, found3, kv_valid = _inputs(Tq=5, Tk=7, d=3, R=2, G=G)
    kv_valid[0, :3] = False
    ins = [t.clone().requires_grad_() for t in (q, lam, q3, mem_k, mem_v, *ks, *vs)]

    def f(q_, lam_, q3_, mk, mv, k1, k2, v1, v2):
        return torch.ops.mka.mka_attention(
            q_, [k1, k2], [v1, v2], lam_, q3_, mk, mv, idx3, found3, kv_valid, 0.5, causal
        )

    assert torch.autograd.gradcheck(f, ins)


def test_backward_blocks_over_queries(monkeypatch) -> None:
    mod = importlib.import_module("mka_compile.kernels.mka_attention.reference")  # the module, not the function

    args = _inputs(Tq=9, Tk=9, R=2)
    g = torch.randn_like(args[0])
    whole = mod.reference_mka_attention_backward(g, *args, 0.5, True)
    monkeypatch.setattr(mod, "BWD_Q_BLOCK", 4)
    blocked = mod.reference_mka_attention_backward(g, *args, 0.5, True)
    torch.testing.assert_close(torch.utils._pytree.tree_leaves(blocked), torch.utils._pytree.tree_leaves(whole))


def test_opcheck() -> None:
    args = list(_inputs(dtype=torch.float32))
    args[0].requires_grad_()
    opcheck(torch.ops.mka.mka_attention.default, (*args, 0.5, True))
    opcheck(torch.ops.mka.mka_attention.default, (*_inputs(dtype=torch.float32, R=0), 0.5, False))


def _cast(args, *dtypes):
    def one(a):
        if isinstance(a, list):
            return [one(x) for x in a]
        for dt in dtypes:
            a = a.to(dt) if a.is_floating_point() else a
        return a

    return [one(a) for a in args]


def test_bf16_inputs() -> None:
    args = _inputs(dtype=torch.float32)
    ref = torch.ops.mka.mka_attention(*_cast(args, torch.bfloat16, torch.float32), 0.5, True)
    out = torch.ops.mka.mka_attention(*_cast(args, torch.bfloat16), 0.5, True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_wrapper_defaults() -> None:
    q, ks, vs, *_ = _inputs(R=0, Tq=9, Tk=9, dtype=torch.float32)
    lam = torch.tensor([1.0, 0.0]).expand(2, 1, 9, 2)
    out = mka_attention(q, ks, vs, lam)
    ref = torch.nn.functional.scaled_dot_product_attention(q, ks[0], vs[0], is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize(
    ("index", "value", "name"),
    [
        (0, torch.zeros(2, 3, 6, 4, dtype=F64), "heads"),
        (0, torch.zeros(2, 4, 10, 4, dtype=F64), "q"),
        (0, torch.zeros(2, 4, 6, 4, dtype=torch.float32), r"ks\[0\]"),
        (3, torch.zeros(2, 1, 6, 2, dtype=F64), "lam"),
        (3, torch.zeros(2, 3, 6, 3, dtype=F64), "lam"),
        (5, torch.zeros(2, 2, 6, 3, dtype=F64), "mem_k"),
        (6, torch.zeros(2, 2, 4, 4, dtype=F64), "mem_v"),
        (7, torch.zeros(2, 2, 6, 3, dtype=torch.int32), "idx3"),
        (8, torch.zeros(2, 2, 6, 3), "found3"),
        (9, torch.zeros(2, 9, dtype=torch.bool, device="meta"), "kv_valid"),
        (9, torch.zeros(1, 9, dtype=torch.bool), "kv_valid"),
    ],
)
def test_bad_input_names_the_argument(index: int, value, name: str) -> None:
    args = list(_inputs())
    args[index] = value
    with pytest.raises(ValueError, match=name):
        torch.ops.mka.mka_attention(*args, 0.5, True)


def test_bad_scale() -> None:
    with pytest.raises(ValueError, match="scale"):
        torch.ops.mka.mka_attention(*_inputs(), -1.0, True)


@pytest.mark.parametrize("R", [0, 3])
def test_backward_opcheck(R: int) -> None:
    args = _inputs(dtype=torch.float32, R=R)
    opcheck(torch.ops.mka.mka_attention_backward.default, (torch.randn_like(args[0]), *args, 0.5, True))
