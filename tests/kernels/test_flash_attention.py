"""``mka::flash_attention``: Triton kernels against the reference, and the op on the CPU.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (tiny shapes, 16-blocks so odd
lengths span several blocks). The interpreter multiplies bfloat16 bit patterns in ``tl.dot``
(triton-lang/triton#11584, unsupported upstream), so bfloat16 kernels are only tested on a GPU.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

# Without a GPU, interpret Triton. Only before triton's first import: set later (another test module got
# there first), kernels defined afterwards would be interpreted while triton's own @jit helpers (tl.max ...)
# stay compiled. The launchers interpret CPU tensors in any case (``flash_attention.launchable``).
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.library import opcheck  # noqa: E402

from mka_compile.kernels.flash_attention import (  # noqa: E402
    flash_attention,
    flash_attention_bwd,
    flash_attention_fwd,
    reference_flash_attention,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCKS = dict(block_m=16, block_n=16)


def _inputs(B=1, H=2, Hkv=2, Tq=17, Tk=17, d=32, mask=None, dtype=torch.float32, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v = r(B, H, Tq, d), r(B, Hkv, Tk, d), r(B, Hkv, Tk, d)
    m = None
    if mask == "bool":
        m = (torch.rand(B, H, Tq, Tk, generator=g) > 0.3).to(device)
    elif mask == "add":
        m = (torch.randn(1, H, Tq, Tk, generator=g) - (torch.rand(1, H, Tq, Tk, generator=g) < 0.2) * 1e4).to(device)
    return q, k, v, m


def _ref_grads(q, k, v, mask, scale, causal, grad_out, grad_lse):
    ins = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out, lse = reference_flash_attention(*ins, mask, scale, causal)
    ((out * grad_out.float()).sum() + (lse * grad_lse.float()).sum()).backward()
    return out.detach(), lse.detach(), [t.grad for t in ins]


# (B, H, Hkv, Tq, Tk, d, causal, mask, (BLOCK_M, BLOCK_N)): odd lengths, causal offsets Tk - Tq in
# {0, 1, 7, 14, 16}, GQA and MQA, both mask kinds, padded head dims, unequal blocks
CASES = [
    (1, 2, 2, 17, 18, 32, True, None, (16, 16)),
    (2, 4, 2, 33, 33, 80, False, "bool", (16, 16)),
    (1, 4, 1, 17, 31, 96, True, "add", (16, 16)),
    (1, 2, 2, 1, 17, 32, True, None, (16, 16)),
    (2, 2, 1, 1, 1, 32, False, "bool", (16, 16)),
    (1, 2, 2, 33, 17, 32, False, "add", (16, 16)),
    (1, 2, 1, 20, 27, 256, True, "bool", (32, 16)),
    (1, 3, 3, 19, 19, 64, True, "add", (16, 32)),
]


@pytest.mark.parametrize(("B", "H", "Hkv", "Tq", "Tk", "d", "causal", "mask", "blocks"), CASES)
def test_kernels_match_reference(B, H, Hkv, Tq, Tk, d, causal, mask, blocks) -> None:
    q, k, v, m = _inputs(B, H, Hkv, Tq, Tk, d, mask)
    scale = d**-0.5
    go, gl = torch.randn_like(q), torch.randn(B, H, Tq, device=q.device)
    ref_out, ref_lse, (dq0, dk0, dv0) = _ref_grads(q, k, v, m, scale, causal, go, gl)

    bm, bn = blocks
    out, lse = flash_attention_fwd(q, k, v, m, scale, causal, block_m=bm, block_n=bn)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    dq, dk, dv = flash_attention_bwd(go, q, k, v, out, lse, m, scale, causal, grad_lse=gl, block_m=bm, block_n=bn)
    for got, want in ((dq, dq0), (dk, dk0), (dv, dv0)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fully_masked_rows_give_zeros_not_nan() -> None:
    B, H, Tq, Tk = 2, 2, 17, 17
    q, k, v, _ = _inputs(B, H, 1, Tq, Tk)
    keep = torch.ones(B, 1, Tq, Tk, dtype=torch.bool, device=DEVICE)
    keep[0, :, :5] = False  # rows 0-4 of batch 0: no key at all
    bias = torch.zeros(1, H, Tq, Tk, device=DEVICE)
    bias[:, 1, 9] = -torch.inf  # row 9 of head 1: every key at -inf
    for m in (keep, bias):
        out, lse = flash_attention_fwd(q, k, v, m, 0.3, True, **BLOCKS)
        ref_out, ref_lse = reference_flash_attention(q, k, v, m, 0.3, True)
        assert torch.isfinite(out).all()
        empty = ref_lse == -torch.inf
        assert empty.sum() == (10 if m is keep else 2)
        assert (out[empty] == 0).all() and (lse[empty] == -torch.inf).all()
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
        go = torch.randn_like(q)
        dq, dk, dv = flash_attention_bwd(go, q, k, v, out, lse, m, 0.3, True, **BLOCKS)
        _, _, want = _ref_grads(q, k, v, m, 0.3, True, go, torch.zeros_like(lse))
        assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
        assert (dq[empty] == 0).all()
        for got, w in zip((dq, dk, dv), want):
            torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-4)


def test_padding_bias_acts_like_a_boolean_mask() -> None:
    """HF-style float32 padding masks (``finfo.min``, not -inf): values <= -1e4 hide the key exactly, so a
    row padded everywhere gives zeros (not eager's accidental average) and every other row matches eager."""
    q, k, v, _ = _inputs(1, 2, 2, 17, 17)
    bias = torch.zeros(1, 1, 17, 17, device=DEVICE)
    bias[..., :4] = torch.finfo(torch.float32).min  # keys 0-3 are padding
    bias[..., 5, :] = -1e9  # query 5 is padding: every key hidden
    bias[..., 9, 11] = -1e4  # exactly the threshold
    out, lse = flash_attention_fwd(q, k, v, bias, 0.3, False, **BLOCKS)
    ref_out, ref_lse = reference_flash_attention(q, k, v, bias, 0.3, False)
    keep = (bias > -1e4).expand(1, 2, 17, 17)
    eager = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.3)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    assert (out[:, :, 5] == 0).all() and (lse[:, :, 5] == -torch.inf).all()
    rows = torch.arange(17, device=DEVICE) != 5
    torch.testing.assert_close(out[:, :, rows], eager[:, :, rows], rtol=1e-4, atol=1e-5)
    go = torch.randn_like(q)
    grads = flash_attention_bwd(go, q, k, v, out, lse, bias, 0.3, False, **BLOCKS)
    _, _, want = _ref_grads(q, k, v, bias, 0.3, False, go, torch.zeros_like(lse))
    for got, w in zip(grads, want):
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float16,
        pytest.param(torch.bfloat16, marks=pytest.mark.skipif(DEVICE == "cpu", reason="interpreter bf16 tl.dot")),
    ],
)
def test_half_precision_accumulates_in_fp32(dtype) -> None:
    q, k, v, m = _inputs(2, 4, 2, 33, 33, 80, "bool", dtype=dtype)
    go = torch.randn_like(q)
    out, lse = flash_attention_fwd(q, k, v, m, 80**-0.5, True, **BLOCKS)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref_out, ref_lse, want = _ref_grads(q, k, v, m, 80**-0.5, True, go, torch.zeros_like(lse))
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=5e-3, atol=5e-3)
    torch.testing.assert_close(out.float(), ref_out, **tol)
    torch.testing.assert_close(lse, ref_lse, **tol)
    grads = flash_attention_bwd(go, q, k, v, out, lse, m, 80**-0.5, True, **BLOCKS)
    for got, w in zip(grads, want):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), w, rtol=5 * tol["rtol"], atol=5 * tol["atol"])


def test_strided_inputs_and_broadcast_mask() -> None:
    """[B, T, H, d] activations transposed to [B, H, T, d] views; mask broadcast over the batch."""
    B, H, Hkv, Tq, Tk, d = 2, 4, 2, 17, 33, 32
    g = torch.Generator().manual_seed(1)
    qt = torch.randn(B, Tq, H, d, generator=g).to(DEVICE)
    kt, vt = torch.randn(B, Tk, Hkv, 2 * d, generator=g).to(DEVICE).split(d, dim=-1)
    q, k, v = qt.transpose(1, 2), kt.transpose(1, 2), vt.transpose(1, 2)  # (B, H, T, d) views
    keep = (torch.rand(1, H, Tq, Tk, generator=g) > 0.5).to(DEVICE)
    out, lse = flash_attention_fwd(q, k, v, keep, 0.2, True, **BLOCKS)
    ref_out, ref_lse = reference_flash_attention(q.contiguous(), k.contiguous(), v.contiguous(), keep, 0.2, True)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    go = torch.randn(B, Tq, H, d, generator=g).to(DEVICE).transpose(1, 2)
    grads = flash_attention_bwd(go, q, k, v, out, lse, keep, 0.2, True, **BLOCKS)
    _, _, want = _ref_grads(q, k, v, keep, 0.2, True, go, torch.zeros_like(lse))
    for got, w in zip(grads, want):
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-4)


def test_default_blocks_and_zero_batch() -> None:
    q, k, v, _ = _inputs(1, 2, 1, 40, 40, 16)
    out, _ = flash_attention_fwd(q, k, v, causal=True)  # default blocks, d padded to 16
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    out, lse = flash_attention_fwd(q[:0], k[:0], v[:0])
    assert out.shape == (0, 2, 40, 16) and lse.shape == (0, 2, 40)


# ------------------------------------------------------------------------------------------ op on CPU


def test_op_matches_sdpa_and_reference() -> None:
    q, k, v, m = _inputs(2, 4, 2, 9, 9, 8, "bool", device="cpu")
    out = flash_attention(q, k, v, causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    out, lse = flash_attention(q, k, v, m, scale=0.3, return_lse=True)
    s = (q.view(2, 2, 2, 9, 8) @ k[:, :, None].transpose(-1, -2)).view(2, 4, 9, 9) * 0.3
    torch.testing.assert_close(lse, s.masked_fill(~m, -torch.inf).logsumexp(-1))


def _cpu64(**kw):
    q, k, v, m = _inputs(dtype=torch.float64, device="cpu", **kw)
    return q, k, v, (m.double() if m is not None and m.is_floating_point() else m)


@pytest.mark.parametrize(("mask", "causal"), [(None, True), ("add", False), ("bool", True)])
def test_gradcheck_fp64(mask, causal) -> None:
    q, k, v, m = _cpu64(B=2, H=4, Hkv=2, Tq=5, Tk=7, d=3, mask=mask)
    if m is not None and m.dtype == torch.bool:
        m[0, 1, 2] = False  # a row with no key: out = 0, lse = -inf (so only out is checked)
    ins = [t.requires_grad_() for t in (q, k, v)]
    if mask == "bool":
        f = lambda q_, k_, v_: torch.ops.mka.flash_attention(q_, k_, v_, m, 0.5, causal)[0]  # noqa: E731
    else:
        f = lambda q_, k_, v_: torch.ops.mka.flash_attention(q_, k_, v_, m, 0.5, causal)  # noqa: E731
    assert torch.autograd.gradcheck(f, ins)


def test_reference_blocks_over_queries(monkeypatch) -> None:
    mod = importlib.import_module("mka_compile.kernels.flash_attention.reference")

    q, k, v, m = _cpu64(Tq=9, Tk=11, d=4, mask="add")
    go, gl = torch.randn_like(q), torch.randn(1, 2, 9, dtype=torch.float64)
    whole = (
        *mod.reference_flash_attention(q, k, v, m, 0.5, True),
        *mod.reference_flash_attention_backward(go, gl, q, k, v, m, 0.5, True),
    )
    monkeypatch.setattr(mod, "Q_BLOCK", 4)
    blocked = (
        *mod.reference_flash_attention(q, k, v, m, 0.5, True),
        *mod.reference_flash_attention_backward(go, gl, q, k, v, m, 0.5, True),
    )
    torch.testing.assert_close(blocked, whole)


@pytest.mark.parametrize("mask", [None, "bool", "add"])
def test_opcheck(mask) -> None:
    q, k, v, m = _inputs(2, 4, 2, 5, 7, 8, mask, device="cpu")
    q.requires_grad_()
    opcheck(torch.ops.mka.flash_attention.default, (q, k, v, m, 0.5, True))
    out, lse = torch.ops.mka.flash_attention(q.detach(), k, v, m, 0.5, True)
    for gl in (None, torch.randn_like(lse)):
        args = (torch.randn_like(out), gl, q.detach(), k, v, m, out, lse, 0.5, True)
        opcheck(torch.ops.mka.flash_attention_backward.default, args)


def test_cuda_implementations_take_op_arguments() -> None:
    """The registered CUDA implementations, called on CPU tensors as the dispatcher would call them on CUDA ones:
    Triton (interpreted) for float32, the reference for float64, the op's checks first."""
    fa = importlib.import_module("mka_compile.kernels.flash_attention")
    for op in ("mka::flash_attention", "mka::flash_attention_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
    q, k, v, m = _inputs(1, 2, 1, 5, 7, 16, "bool", device="cpu")
    out, lse = fa._flash_attention_cuda(q, k, v, m, 0.5, True)
    want_out, want_lse = reference_flash_attention(q, k, v, m, 0.5, True)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    got = fa._flash_attention_backward_cuda(go, gl, q, k, v, m, out, lse, 0.5, True)
    want = fa.reference_flash_attention_backward(go, gl, q, k, v, m, 0.5, True)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-4, atol=1e-4)
    out64, _ = fa._flash_attention_cuda(q.double(), k.double(), v.double(), m, 0.5, True)
    assert out64.dtype == torch.float64
    with pytest.raises(ValueError, match="scale"):
        fa._flash_attention_cuda(q, k, v, m, -1.0, True)


def _bad(name: str):
    q, k, v, m = _inputs(2, 4, 2, 5, 7, 8, device="cpu")
    cases = {
        "q": (q[0], k, v, m),
        "k": (q, k[:, :, :, :4], v, m),
        "v": (q, k, v[:, :, :3], m),
        "heads": (q, k[:, :1].expand(2, 3, 7, 8), v[:, :1].expand(2, 3, 7, 8), m),
        "dtype": (q, k.double(), v, m),
        "mask_rank": (q, k, v, torch.ones(5, 7, dtype=torch.bool)),
        "mask_shape": (q, k, v, torch.ones(2, 4, 1, 7, dtype=torch.bool)),
        "mask_heads": (q, k, v, torch.ones(2, 2, 5, 7, dtype=torch.bool)),
        "mask_dtype": (q, k, v, torch.ones(2, 4, 5, 7, dtype=torch.int32)),
        "causal": (q, k[:, :, :3], v[:, :, :3], m),
    }
    return cases[name]


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("q", "q must have rank 4"),
        ("k", "k must have shape"),
        ("v", "v must have shape"),
        ("heads", "not a multiple"),
        ("dtype", "k has dtype"),
        ("mask_rank", "mask must have rank 4"),
        ("mask_shape", r"mask must have shape \[B or 1, H or 1, Tq, Tk\]"),
        ("mask_heads", "mask must have shape"),
        ("mask_dtype", "mask must be bool"),
        ("causal", "causal queries"),
    ],
)
def test_bad_input_names_the_argument(case: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        torch.ops.mka.flash_attention(*_bad(case), 0.5, case == "causal")


def test_bad_scale_and_triton_dtype() -> None:
    q, k, v, _ = _inputs(device="cpu")
    with pytest.raises(ValueError, match="scale"):
        torch.ops.mka.flash_attention(q, k, v, None, 0.0, False)
    with pytest.raises(ValueError, match="q has dtype torch.float64"):
        flash_attention_fwd(q.double(), k.double(), v.double())


# ------------------------------------------------------------------------- the op on CUDA (dispatcher)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("Tq", "Tk", "d", "mask", "causal"),
    [
        (129, 129, 64, None, True),
        (77, 300, 80, "bool", True),
        (64, 64, 256, "add", False),
        (200, 200, 128, None, False),
    ],
)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_op_forward_backward(dtype, Tq, Tk, d, mask, causal) -> None:
    q, k, v, m = _inputs(2, 8, 2, Tq, Tk, d, mask, dtype=dtype, device="cuda")
    ins = [t.requires_grad_() for t in (q, k, v)]
    out = flash_attention(*ins, m, causal=causal)
    go = torch.randn_like(out)
    out.backward(go)
    ref_out, _, want = _ref_grads(q, k, v, m, d**-0.5, causal, go, torch.zeros(2, 8, Tq, device="cuda"))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(out.float(), ref_out, **tol)
    for t, w in zip(ins, want):
        torch.testing.assert_close(t.grad.float(), w, rtol=5 * tol["rtol"], atol=5 * tol["atol"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_op_opcheck_and_fp64_fallback() -> None:
    q, k, v, m = _inputs(2, 4, 2, 33, 33, 64, "bool", dtype=torch.float16, device="cuda")
    q.requires_grad_()
    opcheck(torch.ops.mka.flash_attention.default, (q, k, v, m, 0.125, True))
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    out = flash_attention(q64, k64, v64, m, causal=True)  # fp64 runs the reference on CUDA
    torch.testing.assert_close(out, reference_flash_attention(q64, k64, v64, m, 64**-0.5, True)[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_offsets_beyond_2_31() -> None:
    """Batch 1 starts 2**31 elements into the storage: every pointer offset must be 64-bit."""
    B, H, T, d = 2, 2, 70, 64
    big = torch.randn(2**31 + H * T * d + 2000, dtype=torch.float16, device="cuda")  # 4 GiB (+ the largest offset)
    strides = (2**31, T * d, d, 1)
    q, k, v = (big.as_strided((B, H, T, d), strides, offset) for offset in (0, 1000, 2000))
    out, lse = flash_attention_fwd(q, k, v, None, 0.125, True)
    ref_out, ref_lse = reference_flash_attention(q.contiguous(), k.contiguous(), v.contiguous(), None, 0.125, True)
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=2e-2, atol=2e-2)
    go = torch.randn_like(out)
    grads = flash_attention_bwd(go, q, k, v, out, lse, None, 0.125, True)
    _, _, want = _ref_grads(q, k, v, None, 0.125, True, go, torch.zeros_like(lse))
    for got, w in zip(grads, want):
        torch.testing.assert_close(got.float(), w, rtol=5e-2, atol=5e-2)
