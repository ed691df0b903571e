"""Triton bounded attention (``kernels/bounded_attention/triton_kernels.py``, ``triton_backward.py``) against the
pure-torch reference.

The launchers run on CPU tensors through the Triton interpreter (tiny shapes, 4-wide blocks so that T and the
key lists span several tiles); the tests marked ``gpu`` go through the ``mka::`` dispatcher on CUDA tensors.
"""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported; CPU tensors run interpreted in any case
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
ref = importlib.import_module("mka_compile.kernels.bounded_attention.reference")
tri = importlib.import_module("mka_compile.kernels.bounded_attention.triton_kernels")
trib = importlib.import_module("mka_compile.kernels.bounded_attention.triton_backward")

BLOCKS = dict(block_t=4, block_m=4)
SCALE = 0.3
NAMES = ("dq", "dk", "dv")


def _freqs(rot: int, base: float = 10000.0) -> torch.Tensor:
    """RoPE frequencies for ``rot`` rotated features (the first is 1 rad per position)."""
    return (1.0 / base ** (torch.arange(rot // 2, dtype=torch.float64) * 2 / max(rot, 1))).float()


def _inputs(B=2, H=4, G=2, T=7, P=11, M=6, d=32, rot=16, max_delta=10**5, bthd=False, dtype=torch.float32, seed=0):
    """Op arguments without scale and interleaved: random lists with holes (-1, -2), duplicate entries, one
    query without any entry, deltas up to ``max_delta``; ``bthd``: q/k/v are strided views of ``[B, T, H, d]``."""
    g = torch.Generator().manual_seed(seed)

    def r(h, t):
        x = torch.randn(B, t, h, d, generator=g).transpose(1, 2) if bthd else torch.randn(B, h, t, d, generator=g)
        return x.to(dtype)

    q, k, v = r(H, T), r(G, P), r(G, P)
    idx = torch.randint(-2, P, (B, G, T, M), generator=g)
    if M >= 3:
        idx[..., 1] = idx[..., 2].clamp_min(0)  # a key listed twice counts twice
    idx[0, 0, T // 2] = -1  # a query without entries
    delta = torch.randint(-max_delta, max_delta + 1, (B, G, T, M), generator=g)
    return q, k, v, idx, delta, _freqs(rot)


def _f64(args):
    """q, k, v in float64 (idx, delta, freqs as they are): the reference then computes in float64."""
    return [a.double() if i < 3 else a for i, a in enumerate(args)]


def _close(name, got, want, dtype, tol=2e-5):
    """``got`` in the input dtype against a float64 reference of the same (rounded) inputs."""
    assert got.dtype == dtype and got.shape == want.shape, name
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
        return
    err = float((got.double() - want).norm() / want.norm().clamp_min(1e-12))  # one bf16 rounding, atomics
    assert err <= 1e-2, f"{name}: normwise relative error {err:.2e}"
    torch.testing.assert_close(got.double(), want, rtol=5e-2, atol=5e-2, msg=lambda m: f"{name}: {m}")


def _check_fwd_bwd(args, interleaved, dtype, blocks=BLOCKS, tol=2e-5):
    out, lse = tri.bounded_attention_fwd(*args, SCALE, interleaved, **blocks)
    want_out, want_lse = ref.reference_bounded_attention(*_f64(args), SCALE, interleaved)
    _close("out", out, want_out, dtype, tol)
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse, want_lse.float(), rtol=tol, atol=tol)  # -inf where the reference has -inf
    go = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    gl = torch.randn(args[0].shape[:3], generator=torch.Generator().manual_seed(2))  # the lse's gradient too
    got = trib.bounded_attention_bwd(go, gl, *args, SCALE, interleaved, **blocks)
    want = ref.reference_bounded_attention_backward(go.double(), gl.double(), *_f64(args), SCALE, interleaved)
    for name, g_, w_ in zip(NAMES, got, want):
        assert g_.is_contiguous(), name
        _close(name, g_, w_, dtype, tol)


CASES = {
    # name: (input options, interleaved)
    "decode-T1-gqa-d16-full-rotary": (dict(T=1, M=5, d=16, rot=16), False),
    "T7-d32-partial-rotary-interleaved": (dict(H=2, G=2, d=32, rot=16), True),
    "T9-mqa-d64-no-rotation-M3": (dict(H=3, G=1, T=9, M=3, d=64, rot=0), False),
    "T6-d64-full-rotary-M11-strided": (dict(B=1, T=6, M=11, d=64, rot=64, bthd=True), False),
    "T5-d20-partial-interleaved-M7": (dict(B=1, H=2, G=1, T=5, M=7, d=20, rot=12), True),
    "bf16-gqa-d32-partial-rotary": (dict(T=5, d=32, rot=8, dtype=torch.bfloat16), False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_backward_match_reference(case: str) -> None:
    opts, interleaved = CASES[case]
    _check_fwd_bwd(_inputs(**opts), interleaved, opts.get("dtype", torch.float32))


@pytest.mark.parametrize("interleaved", [False, True])
def test_large_deltas_keep_float32_accuracy(interleaved: bool) -> None:
    """Deltas up to 1e6 with frequencies up to 1 rad (a float32 product would be off by ~0.06 rad)."""
    args = _inputs(B=1, H=2, G=1, T=5, M=6, d=16, rot=16, max_delta=10**6, seed=3)
    args[4][0, 0, :, 0] = torch.tensor([10**6, -(10**6), 999_983, 2**20 + 1, -777_777])
    _check_fwd_bwd(args, interleaved, torch.float32)


def test_turn_steps_reduce_angles_exactly() -> None:
    """``delta * step`` (wrapping int64) in radians equals the float64 angle modulo 2pi, up to float32 rounding."""
    freqs = torch.cat([_freqs(64), torch.tensor([math.pi, 7.0, 1e-6])]).float()
    steps = tri.turn_steps(freqs)
    delta = torch.tensor([0, 1, -1, 12345, -99_999, 10**6, -(10**6), 2**28 - 3])[:, None]
    got = (delta * steps).to(torch.float32).double() * (2 * math.pi / 2.0**64)  # torch int64 wraps like the kernel
    exact = delta.double() * freqs.double()  # exact products for |delta| < 2**29
    err = torch.remainder(got - exact + math.pi, 2 * math.pi) - math.pi
    assert err.abs().max() < 4e-7
    assert got.abs().max() <= math.pi
    assert ((delta.float() * freqs) - exact).abs().max() > 1e-2  # what the float32 product would lose


def test_queries_without_entries_and_empty_lists() -> None:
    args = list(_inputs(B=1, H=2, G=1, T=6, M=4, d=16, rot=8))
    args[3][0, 0, 1:4] = -1  # three queries without entries
    out, lse = tri.bounded_attention_fwd(*args, SCALE, False, **BLOCKS)
    assert torch.all(out[:, :, 1:4] == 0) and torch.isneginf(lse[:, :, 1:4]).all()
    assert torch.isfinite(lse[:, :, 4:]).all()
    _check_fwd_bwd(args, False, torch.float32)
    args[3], args[4] = args[3][..., :0], args[4][..., :0]  # M = 0: nobody sees anything
    out, lse = tri.bounded_attention_fwd(*args, SCALE, False, **BLOCKS)
    assert torch.all(out == 0) and torch.isneginf(lse).all()
    dq, dk, dv = trib.bounded_attention_bwd(
        torch.ones_like(out), lse.new_ones(lse.shape), *args, SCALE, False, **BLOCKS
    )
    assert dq.abs().sum() == 0 and dk.abs().sum() == 0 and dv.abs().sum() == 0


def test_default_tiles_and_decode() -> None:
    _check_fwd_bwd(_inputs(B=1, H=2, G=1, T=3, M=9, d=32, rot=32), True, torch.float32, blocks={})
    _check_fwd_bwd(_inputs(B=1, H=4, G=1, T=1, M=13, d=64, rot=32), False, torch.float32, blocks={})


def test_cuda_kernels_registered_and_take_op_arguments() -> None:
    for op in ("mka::bounded_attention", "mka::bounded_attention_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
    args = _inputs(B=1, H=2, G=1, T=3, M=3, d=16, rot=8)  # called as the dispatcher would (on CPU tensors)
    out, lse = tri._bounded_attention_cuda(*args, SCALE, True)
    want = ref.reference_bounded_attention(*_f64(args), SCALE, True)
    _close("out", out, want[0], torch.float32)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    got = trib._bounded_attention_backward_cuda(go, gl, *args, SCALE, True)
    want = ref.reference_bounded_attention_backward(go.double(), gl.double(), *_f64(args), SCALE, True)
    for name, g_, w_ in zip(NAMES, got, want):
        _close(name, g_, w_, torch.float32)
    out64, _ = tri._bounded_attention_cuda(*_f64(args), SCALE, True)  # float64 (gradcheck) runs the reference
    assert out64.dtype == torch.float64
    with pytest.raises(ValueError, match="idx"):
        tri._bounded_attention_cuda(args[0], args[1], args[2], args[3].int(), *args[4:], SCALE, True)


# ------------------------------------------------------------------------------------------ GPU, dispatcher


@pytest.mark.parametrize(
    ("dtype", "H", "G", "T", "M", "d", "rot", "interleaved"),
    [
        (torch.float32, 4, 2, 333, 40, 64, 64, False),
        (torch.bfloat16, 8, 2, 1000, 96, 128, 64, True),
        (torch.float16, 4, 4, 1, 300, 128, 128, False),
    ],
)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_dispatch_forward_backward(dtype, H, G, T, M, d, rot, interleaved) -> None:
    args = _inputs(B=2, H=H, G=G, T=T, P=T + 64, M=M, d=d, rot=rot, max_delta=10**6, bthd=True, dtype=dtype)
    dev = [a.to("cuda") for a in args]
    for t in dev[:3]:
        t.requires_grad_()
    out, lse = torch.ops.mka.bounded_attention(*dev, SCALE, interleaved)
    want_out, want_lse = ref.reference_bounded_attention(*_f64(args), SCALE, interleaved)
    _close("out", out.detach().cpu(), want_out, dtype, 1e-4)
    torch.testing.assert_close(lse.detach().cpu(), want_lse.float(), rtol=1e-4, atol=1e-4)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out, lse), dev[:3], (go, gl))
    want = ref.reference_bounded_attention_backward(
        go.cpu().double(), gl.cpu().double(), *_f64(args), SCALE, interleaved
    )
    for name, g_, w_ in zip(NAMES, got, want):
        _close(name, g_.cpu(), w_, dtype, 1e-4)
