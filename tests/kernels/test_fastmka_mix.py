"""``mka::fastmka_mix``: the fused FastMKA memory path (session scan + route-mix + RoPE).

The CPU op (pure torch) is checked against the unfused composition FastMKAAttention uses, with opcheck and
an fp64 gradcheck; the Triton launchers run on CPU tensors through the interpreter against the reference;
the tests marked ``gpu`` go through the dispatcher on CUDA tensors.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported; CPU tensors run interpreted in any case
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch.library import opcheck  # noqa: E402

from mka_compile import kernels as K  # noqa: E402
from mka_compile.layers.rope import RotaryEmbedding  # noqa: E402

fm = importlib.import_module("mka_compile.kernels.fastmka_mix")

F64 = torch.float64
BETA = 0.8


def _inputs(B=2, H=3, T=17, d=6, G=1, k3=False, rope=False, dtype=torch.float32, seed=0, bthd=False):
    """Op arguments (lam, k1, v1, k3, v3, valid, state_k, state_v, n_seen, beta, cos, sin) and the real
    positions. Random holes; row 0 starts with 3 pads and n_seen = 0, the other rows have n_seen = 7."""
    g = torch.Generator().manual_seed(seed)
    sdt = F64 if dtype == F64 else torch.float32

    def r():
        x = torch.randn(B, T, H, d, generator=g).transpose(1, 2) if bthd else torch.randn(B, H, T, d, generator=g)
        return x.to(dtype)

    L = 3 if k3 else 2
    lam = torch.softmax(torch.randn(B, G, T, L, generator=g, dtype=sdt), -1)
    k1, v1 = r(), r()
    k3_, v3_ = (r(), r()) if k3 else (None, None)
    valid = torch.rand(B, T, generator=g) > 0.3
    valid[0, : min(3, T - 1)] = False
    st_k, st_v = torch.randn(B, H, d, generator=g, dtype=sdt), torch.randn(B, H, d, generator=g, dtype=sdt)
    n_seen = torch.tensor([0] + [7] * (B - 1))
    pos = K.real_positions(valid, n_seen)
    cos, sin = K.rope_tables(pos, d, dtype=sdt) if rope else (None, None)
    return [lam, k1, v1, k3_, v3_, valid, st_k, st_v, n_seen, BETA, cos, sin], pos


def _flat(out) -> list[torch.Tensor]:
    return [t for x in out for t in (x if isinstance(x, (list, tuple)) else [x])]


def _close(got, want, dtype, what: str) -> None:
    got, want = _flat(got), _flat(want)
    assert len(got) == len(want), what
    tol = {torch.bfloat16: dict(rtol=2e-2, atol=3e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}.get(
        dtype, dict(rtol=1e-5, atol=1e-5)
    )
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}[{i}]: {a.dtype}{tuple(a.shape)} vs {b.dtype}"
        torch.testing.assert_close(a.double(), b.double(), **tol, msg=lambda m, i=i: f"{what}[{i}]: {m}")


# ------------------------------------------------------------------------------------------ CPU op (reference)


@pytest.mark.parametrize(("G", "k3", "rope"), [(1, False, True), (3, True, True), (3, True, False)])
def test_equals_fastmka_attention_composition(G: int, k3: bool, rope: bool) -> None:
    """FastMKAAttention's path: session_scan -> route_mix -> RotaryEmbedding(kf, pos) (float32)."""
    args, pos = _inputs(T=45, G=G, k3=k3, rope=rope)
    lam, k1, v1, k3_, v3_, valid, st_k, st_v, n_seen, beta = args[:10]
    s_k, s_v, new_k, new_v = K.session_scan(k1, v1, beta, valid, st_k, st_v, n_seen)
    ks, vs = [k1, s_k] + ([k3_] if k3 else []), [v1, s_v] + ([v3_] if k3 else [])
    kf, vf = K.route_mix(lam, ks, vs)
    if rope:
        kf = RotaryEmbedding(k1.shape[-1])(kf, pos)
    got = torch.ops.mka.fastmka_mix(*args)
    for a, b in zip(got, (kf, vf, new_k, new_v)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_is_rounded_once() -> None:
    args, _ = _inputs(dtype=torch.bfloat16, k3=True, rope=True)
    kf, vf, st_k, _ = torch.ops.mka.fastmka_mix(*args)
    assert kf.dtype == vf.dtype == torch.bfloat16 and st_k.dtype == torch.float32
    up = [a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a for a in args]
    want = torch.ops.mka.fastmka_mix(*up)
    torch.testing.assert_close(kf, want[0].bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(st_k, want[2])


@pytest.mark.parametrize(("G", "k3", "rope"), [(1, False, False), (2, True, True)])
def test_gradcheck_fp64(G: int, k3: bool, rope: bool) -> None:
    args, _ = _inputs(B=2, H=2, T=6, d=4, G=G, k3=k3, rope=rope, dtype=F64)
    diff = [i for i in (0, 1, 2, 3, 4, 6, 7, 10, 11) if args[i] is not None]
    for i in diff:
        args[i] = args[i].clone().requires_grad_()

    def f(*xs):
        a = list(args)
        for i, x in zip(diff, xs):
            a[i] = x
        return torch.ops.mka.fastmka_mix(*a)

    assert torch.autograd.gradcheck(f, [args[i] for i in diff], fast_mode=True)


@pytest.mark.parametrize(("G", "k3", "rope"), [(1, False, False), (3, True, True), (1, True, False)])
def test_opcheck(G: int, k3: bool, rope: bool) -> None:
    args, _ = _inputs(T=5, G=G, k3=k3, rope=rope)
    for i in (0, 1, 2, 3, 4, 6, 7):
        if args[i] is not None:
            args[i].requires_grad_()
    opcheck(torch.ops.mka.fastmka_mix.default, tuple(args))
    grads = [torch.randn_like(args[i]) for i in (1, 2, 6, 7)]
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    opcheck(torch.ops.mka.fastmka_mix_backward.default, (*grads, *plain, rope))


def test_rope_tables_match_rotary_embedding() -> None:
    pos = torch.tensor([[0, 0, 1, 2, 50], [7, 8, 9, 10, 11]])
    x = torch.randn(2, 3, 5, 8)
    cos, sin = K.rope_tables(pos, 8)
    torch.testing.assert_close(x * cos[:, None] + fm.rotate_half(x) * sin[:, None], RotaryEmbedding(8)(x, pos))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda a: a.__setitem__(3, torch.zeros_like(a[1])), "both k3 and v3"),
        (lambda a: a.__setitem__(0, a[0][..., :1]), "lam"),
        (lambda a: a.__setitem__(0, torch.cat([a[0], a[0]], 1)), "routing groups"),
        (lambda a: a.__setitem__(10, a[10][:, :, :4]), "cos"),
        (lambda a: a.__setitem__(11, None), "both cos and sin"),
        (lambda a: a.__setitem__(6, a[6].double()), "state_k"),
    ],
)
def test_bad_arguments_explain(mutate, match: str) -> None:
    args, _ = _inputs(T=3, rope=True)
    mutate(args)
    with pytest.raises(ValueError, match=match):
        torch.ops.mka.fastmka_mix(*args)


# ------------------------------------------------------------------------------------------ Triton (interpreter)

# (T, dtype, G, k3, rope, d): odd d without RoPE exercises the unpaired last feature column
TRITON_CASES = [
    (1, torch.float32, 1, False, False, 5),
    (17, torch.float32, 3, True, True, 6),
    (45, torch.bfloat16, 1, True, True, 6),
    (17, torch.bfloat16, 3, False, True, 6),
    (45, torch.float32, 3, False, False, 5),
]
TRITON_IDS = ["T1-fp32-G1", "T17-fp32-G3-k3-rope", "T45-bf16-G1-k3-rope", "T17-bf16-G3-rope", "T45-fp32-G3-odd_d"]


@pytest.mark.parametrize(("T", "dtype", "G", "k3", "rope", "d"), TRITON_CASES, ids=TRITON_IDS)
def test_triton_forward_backward_match_reference(T, dtype, G, k3, rope, d) -> None:
    pytest.importorskip("triton")
    tri = importlib.import_module("mka_compile.kernels.fastmka_mix_triton")
    args, _ = _inputs(T=T, d=d, G=G, k3=k3, rope=rope, dtype=dtype, bthd=T == 45)
    blocks = dict(BLOCK_T=16, BLOCK_H=2)
    out = tri.fastmka_mix_fwd(*args, **blocks)
    _close(out, fm.reference_fastmka_mix(*args), dtype, "forward")
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(x.shape, generator=g).to(x.dtype) for x in out]
    got = tri.fastmka_mix_bwd(*grads, *args, rope_grad=rope, **blocks)
    _close(got, fm.reference_fastmka_mix_backward(*grads, *args, rope), dtype, "backward")


def test_triton_default_blocks_without_rope_grad() -> None:
    pytest.importorskip("triton")
    tri = importlib.import_module("mka_compile.kernels.fastmka_mix_triton")
    args, _ = _inputs(B=2, H=2, T=20, d=8, G=2, k3=True, rope=True)
    args[5][0] = False  # a padding-only row with n_seen = 0 keeps its state
    out = tri.fastmka_mix_fwd(*args)
    torch.testing.assert_close(out[2][0], args[6][0])
    _close(out, fm.reference_fastmka_mix(*args), torch.float32, "forward")
    grads = [torch.randn_like(x) for x in out]
    got = tri.fastmka_mix_bwd(*grads, *args)
    assert got[6] == []
    _close(got, fm.reference_fastmka_mix_backward(*grads, *args, False), torch.float32, "backward")


def test_cuda_kernels_registered_and_take_op_arguments() -> None:
    pytest.importorskip("triton")
    tri = importlib.import_module("mka_compile.kernels.fastmka_mix_triton")
    for op in ("mka::fastmka_mix", "mka::fastmka_mix_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
    args, _ = _inputs(B=1, H=2, T=3, d=4, G=2, k3=True, rope=True)  # as the dispatcher calls them (CPU here)
    out = tri._fastmka_mix_cuda(*args)
    _close(out, fm.reference_fastmka_mix(*args), torch.float32, "forward")
    got = tri.fastmka_mix_bwd(*out, *args, True)
    _close(got, fm.reference_fastmka_mix_backward(*out, *args, True), torch.float32, "backward")
    args[3] = None
    with pytest.raises(ValueError, match="both k3 and v3"):
        tri._fastmka_mix_cuda(*args)


# ------------------------------------------------------------------------------------------ GPU, dispatcher


@pytest.mark.parametrize(
    ("dtype", "G", "k3", "rope", "d"),
    [(torch.float32, 1, True, True, 64), (torch.bfloat16, 4, False, True, 128), (torch.float16, 1, True, False, 80)],
)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_dispatch_forward_backward(dtype, G, k3, rope, d) -> None:
    args, _ = _inputs(B=2, H=4, T=300, d=d, G=G, k3=k3, rope=rope, dtype=dtype, bthd=True)
    diff = [i for i in (0, 1, 2, 3, 4, 6, 7, 10, 11) if args[i] is not None]
    dev = [a.to("cuda") if isinstance(a, torch.Tensor) else a for a in args]
    for i in diff:
        dev[i].requires_grad_()
    out = torch.ops.mka.fastmka_mix(*dev)
    _close([o.cpu() for o in out], fm.reference_fastmka_mix(*args), dtype, "forward")
    grads = [torch.randn_like(o) for o in out]
    got = torch.autograd.grad(out, [dev[i] for i in diff], grads)
    want = fm.reference_fastmka_mix_backward(*[g.cpu() for g in grads], *args, rope)
    dlam, dk1, dv1, dsk, dsv, d_long, d_rope = want
    want = [dlam, dk1, dv1, *d_long, dsk, dsv, *d_rope]
    _close([x.cpu() for x in got], want, dtype, "backward")
    opcheck(torch.ops.mka.fastmka_mix.default, tuple(dev))
