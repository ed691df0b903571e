from __future__ import annotations

import pytest
import torch
from naive_mka import naive_ema
from torch.library import opcheck

from mka_compile.kernels import session_scan
from mka_compile.kernels.session_scan.reference import SCAN_CHUNK, linear_scan

F64 = torch.float64


def _inputs(B=2, H=3, T=45, d=5, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, T, d, generator=g, dtype=dtype)
    v = torch.randn(B, H, T, d, generator=g, dtype=dtype)
    valid = torch.rand(B, T, generator=g) > 0.25
    sdt = F64 if dtype == F64 else torch.float32
    sk = torch.randn(B, H, d, generator=g, dtype=sdt)
    sv = torch.randn(B, H, d, generator=g, dtype=sdt)
    n_seen = torch.tensor([0] + [7] * (B - 1))
    return k, v, valid, sk, sv, n_seen


@pytest.mark.parametrize("T", [1, 2, SCAN_CHUNK - 1, SCAN_CHUNK, 3 * SCAN_CHUNK + 5])
def test_matches_naive_definition(T: int) -> None:
    k, v, valid, sk, sv, n_seen = _inputs(T=T)
    out_k, out_v, st_k, st_v = torch.ops.mka.session_scan(k, v, valid, sk, sv, n_seen, 0.8)
    ref_k = naive_ema(k, valid, 0.8, sk, n_seen)
    ref_v = naive_ema(v, valid, 0.8, sv, n_seen)
    torch.testing.assert_close(out_k, ref_k, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out_v, ref_v, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(st_k, ref_k[:, :, -1])
    torch.testing.assert_close(st_v, ref_v[:, :, -1])


def test_padding_leaves_state_untouched() -> None:
    k, v, valid, sk, sv, n_seen = _inputs(T=8)
    valid[:] = False
    out_k, _, st_k, _ = torch.ops.mka.session_scan(k, v, valid, sk, sv, n_seen, 0.9)
    torch.testing.assert_close(st_k, sk)
    torch.testing.assert_close(out_k, sk[:, :, None].expand_as(out_k))


def test_carried_state_equals_one_call() -> None:
    k, v, valid, sk, sv, _ = _inputs(T=70, dtype=torch.float32)
    n0 = torch.zeros(k.shape[0], dtype=torch.int64)
    full_k, full_v, *_ = session_scan(k, v, 0.9, valid)
    st_k, st_v, n = torch.zeros_like(sk), torch.zeros_like(sv), n0
    pieces = []
    for a, b in [(0, 3), (3, 4), (4, 40), (40, 41), (41, 70)]:
        ok, ov, st_k, st_v = session_scan(k[:, :, a:b], v[:, :, a:b], 0.9, valid[:, a:b], st_k, st_v, n)
        n = n + valid[:, a:b].sum(-1)
        pieces.append(ok)
    torch.testing.assert_close(torch.cat(pieces, 2), full_k, rtol=1e-5, atol=1e-6)


def test_bf16_long_sequence_state_stays_accurate() -> None:
    B, H, T, d = 1, 2, 4096, 8
    k64 = torch.randn(B, H, T, d, dtype=F64)
    kb = k64.bfloat16()
    out_k, _, st_k, _ = session_scan(kb, kb, 0.99)
    assert out_k.dtype == torch.bfloat16 and st_k.dtype == torch.float32
    ref = naive_ema(kb.double(), torch.ones(B, T, dtype=torch.bool), 0.99)
    rel = (st_k.double() - ref[:, :, -1]).norm() / ref[:, :, -1].norm()
    assert rel < 1e-2
    rel_all = (out_k.double() - ref).norm() / ref.norm()
    assert rel_all < 1e-2


def test_linear_scan_handles_zero_decay() -> None:
    a = torch.tensor([[0.5, 0.0, 0.5, 1.0, 0.0]], dtype=F64)
    x = torch.arange(5, dtype=F64).view(1, 1, 5, 1) + 1
    h = linear_scan(a, x, torch.full((1, 1, 1), 10.0, dtype=F64), chunk=2)
    want, s = [], 10.0
    for t in range(5):
        s = float(a[0, t]) * s + float(x[0, 0, t, 0])
        want.append(s)
    torch.testing.assert_close(h.flatten(), torch.tensor(want, dtype=F64))


def test_gradcheck_fp64() -> None:
    k, v, valid, sk, sv, n_seen = _inputs(T=37, d=3)
    ins = [t.clone().requires_grad_() for t in (k, v, sk, sv)]
    assert torch.autograd.gradcheck(lambda a, b, c, e: torch.ops.mka.session_scan(a, b, valid, c, e, n_seen, 0.7), ins)


def test_opcheck() -> None:
    k, v, valid, sk, sv, n_seen = _inputs(T=20, dtype=torch.float32)
    opcheck(torch.ops.mka.session_scan.default, (k, v, valid, sk, sv, n_seen, 0.9))
    k.requires_grad_()
    opcheck(torch.ops.mka.session_scan.default, (k, v, valid, sk, sv, n_seen, 0.9))
    g = torch.randn_like(k)
    opcheck(
        torch.ops.mka.session_scan_backward.default,
        (g, g.clone(), torch.randn_like(sk), torch.randn_like(sv), k.detach(), v, valid, sk, sv, n_seen, 0.9),
    )


def _bad(**over):
    k, v, valid, sk, sv, n_seen = _inputs(T=6, dtype=torch.float32)
    args = dict(k=k, v=v, valid=valid, state_k=sk, state_v=sv, n_seen=n_seen, beta=0.9)
    args.update(over)
    return args


@pytest.mark.parametrize(
    ("over", "name"),
    [
        (dict(k=torch.randn(2, 3, 6)), "k"),
        (dict(v=torch.randn(2, 3, 6, 4)), "v"),
        (dict(v=torch.randn(2, 3, 6, 5, dtype=F64)), "v"),
        (dict(valid=torch.ones(2, 5, dtype=torch.bool)), "valid"),
        (dict(valid=torch.ones(2, 6)), "valid"),
        (dict(state_k=torch.zeros(2, 3, 5, dtype=torch.bfloat16)), "state_k"),
        (dict(state_v=torch.zeros(1, 3, 5)), "state_v"),
        (dict(n_seen=torch.zeros(2, dtype=torch.int32)), "n_seen"),
        (dict(beta=1.0), "beta"),
        (dict(beta=0.0), "beta"),
        (dict(beta=1.2), "beta"),
        (dict(k=torch.randn(2, 3, 6, 5, device="meta")), "device"),
    ],
)
def test_bad_input_names_the_argument(over, name) -> None:
    with pytest.raises(ValueError, match=name):
        torch.ops.mka.session_scan(**_bad(**over))


def test_non_contiguous_inputs_fake_and_real_strides_agree() -> None:
    """Outputs are contiguous in the fake and the real implementation alike (Inductor checks strides)."""
    k = torch.randn(2, 13, 3, 5).transpose(1, 2)  # (B, H, T, d) view of a [B, T, H, d] projection
    valid = torch.ones(2, 13, dtype=torch.bool)
    st = torch.zeros(2, 3, 5)
    n0 = torch.zeros(2, dtype=torch.int64)
    opcheck(torch.ops.mka.session_scan.default, (k, k, valid, st, st.clone(), n0, 0.9))

    def f(x):
        kk = x.view(2, 13, 3, 5).transpose(1, 2)
        a, b, _, _ = torch.ops.mka.session_scan(kk, kk, valid, st, st, n0, 0.9)
        return a.transpose(1, 2).reshape(2, 13, 15) + b.sum()

    x = torch.randn(2, 13, 15)
    torch.testing.assert_close(torch.compile(f, backend="aot_eager")(x), f(x))


@pytest.mark.parametrize("T", [1, SCAN_CHUNK, 3 * SCAN_CHUNK + 5])
def test_first_call_without_padding_matches_general_path(T: int) -> None:
    """All tokens real and nothing seen: the scan uses cached decay matrices; values and gradients equal the
    naive definition and the general path (the same inputs with one padded token appended)."""
    k, v, _, sk, sv, _ = _inputs(T=T)
    k.requires_grad_(True)
    v.requires_grad_(True)
    valid = torch.ones(k.shape[0], T, dtype=torch.bool)
    n0 = torch.zeros(k.shape[0], dtype=torch.int64)
    out_k, out_v, st_k, st_v = torch.ops.mka.session_scan(k, v, valid, sk, sv, n0, 0.8)
    torch.testing.assert_close(out_k, naive_ema(k.detach(), valid, 0.8, sk, n0), rtol=1e-9, atol=1e-10)
    pad = lambda t: torch.cat([t, t[:, :, :1]], 2)  # noqa: E731
    general = torch.ops.mka.session_scan(pad(k), pad(v), torch.cat([valid, valid[:, :1] & False], 1), sk, sv, n0, 0.8)
    torch.testing.assert_close(out_v, general[1][:, :, :T], rtol=1e-9, atol=1e-10)
    w = torch.randn_like(out_k)
    g_fast = torch.autograd.grad((out_k * w).sum() + (out_v * w).sum() + st_k.sum() + st_v.sum(), (k, v))
    g_gen = torch.autograd.grad(
        (general[0][:, :, :T] * w).sum() + (general[1][:, :, :T] * w).sum() + general[2].sum() + general[3].sum(),
        (k, v),
    )
    for a, b in zip(g_fast, g_gen):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    opcheck(torch.ops.mka.session_scan.default, (k, v, valid, sk, sv, n0, 0.8))
