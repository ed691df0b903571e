"""``mka::decode_attention``: split-K Triton kernels against the reference, and the op on the CPU.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (tiny shapes, 16-key blocks so a
short cache already spans several splits). bfloat16 kernels are only tested on a GPU (the interpreter's
``tl.dot`` multiplies bfloat16 bit patterns, triton-lang/triton#11584).
"""

from __future__ import annotations

import os
import sys

import torch

# Without a GPU, interpret Triton. Only before triton's first import: set later (another test module got
# there first), kernels defined afterwards would be interpreted while triton's own @jit helpers (tl.max ...)
# stay compiled. The launchers interpret CPU tensors in any case (``flash_attention.launchable``).
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch.library import opcheck  # noqa: E402

from mka_compile.kernels.decode_attention import (  # noqa: E402
    decode_attention,
    decode_attention_fwd,
    reference_decode_attention,
)
from mka_compile.kernels.flash_attention import flash_attention_fwd  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B=2, H=4, Hkv=2, Tq=1, Tk=37, d=32, valid=False, dtype=torch.float32, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    kv_valid = (torch.rand(B, Tk, generator=g) > 0.3).to(device) if valid else None
    return r(B, H, Tq, d), r(B, Hkv, Tk, d), r(B, Hkv, Tk, d), kv_valid


# (B, H, Hkv, Tq, Tk, d, causal, valid, num_splits): GQA / MQA / MHA, 1..3 queries, odd cache lengths
CASES = [
    (2, 4, 2, 1, 37, 32, True, False, 3),
    (2, 4, 1, 3, 70, 80, True, True, None),
    (1, 2, 2, 2, 17, 96, False, True, 1),
    (1, 8, 1, 1, 50, 32, False, False, 4),
    (1, 2, 1, 1, 330, 32, False, True, 21),  # 21 splits: the merge walks them in two chunks of 16
]


@pytest.mark.parametrize(("B", "H", "Hkv", "Tq", "Tk", "d", "causal", "valid", "splits"), CASES)
def test_kernels_match_reference(B, H, Hkv, Tq, Tk, d, causal, valid, splits) -> None:
    q, k, v, kv_valid = _inputs(B, H, Hkv, Tq, Tk, d, valid)
    out, lse = decode_attention_fwd(q, k, v, kv_valid, d**-0.5, causal, num_splits=splits, block_n=16)
    ref_out, ref_lse = reference_decode_attention(q, k, v, kv_valid, d**-0.5, causal)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_rows_without_keys_give_zeros_and_empty_splits_merge() -> None:
    q, k, v, _ = _inputs(B=3, Tq=3, Tk=40)
    kv_valid = torch.ones(3, 40, dtype=torch.bool, device=DEVICE)
    kv_valid[0] = False  # batch row 0: an empty cache
    kv_valid[1, :38] = False  # batch row 1: left padding; causal query 0 (key 37) sees nothing
    kv_valid[2, 16:] = False  # batch row 2: only the first of the 3 splits (16 keys each) holds valid keys
    out, lse = decode_attention_fwd(q, k, v, kv_valid, 0.4, True, num_splits=4, block_n=8)
    ref_out, ref_lse = reference_decode_attention(q, k, v, kv_valid, 0.4, True)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (lse[0] == -torch.inf).all()
    assert (out[1, :, 0] == 0).all() and (lse[1, :, 1:] > -torch.inf).all()
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float16,
        pytest.param(torch.bfloat16, marks=pytest.mark.skipif(DEVICE == "cpu", reason="interpreter bf16 tl.dot")),
    ],
)
def test_half_precision(dtype) -> None:
    q, k, v, kv_valid = _inputs(Tq=2, Tk=45, d=80, valid=True, dtype=dtype)
    out, lse = decode_attention_fwd(q, k, v, kv_valid, 0.1, True, num_splits=3, block_n=16)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref_out, ref_lse = reference_decode_attention(q.float(), k.float(), v.float(), kv_valid, 0.1, True)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=5e-3, atol=5e-3)
    torch.testing.assert_close(out.float(), ref_out, **tol)
    torch.testing.assert_close(lse, ref_lse, **tol)


def test_agrees_with_flash_kernel_on_strided_cache() -> None:
    """A [B, Tk, Hkv, d] cache viewed as [B, Hkv, Tk, d]; default splits and blocks."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 2, 64, generator=g).to(DEVICE)
    kv = torch.randn(2, 100, 2, 2, 64, generator=g).to(DEVICE)
    k, v = kv[:, :, :, 0].transpose(1, 2), kv[:, :, :, 1].transpose(1, 2)  # (B, Hkv, Tk, d) views
    out, lse = decode_attention_fwd(q, k, v, causal=True)
    flash_out, flash_lse = flash_attention_fwd(q, k, v, causal=True, block_m=16, block_n=32)
    torch.testing.assert_close(out, flash_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, flash_lse, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ op on CPU


@pytest.mark.parametrize("valid", [False, True])
def test_opcheck(valid: bool) -> None:
    q, k, v, kv_valid = _inputs(Tq=2, Tk=9, d=8, valid=valid, device="cpu")
    opcheck(torch.ops.mka.decode_attention.default, (q, k, v, kv_valid, 0.5, True))


def test_wrapper_and_inference_only() -> None:
    q, k, v, kv_valid = _inputs(Tq=2, Tk=9, d=8, valid=True, device="cpu")
    out = decode_attention(q, k, v, kv_valid, causal=True)
    torch.testing.assert_close(out, reference_decode_attention(q, k, v, kv_valid, 8**-0.5, True)[0])
    out = decode_attention(q.requires_grad_(), k, v, kv_valid)
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("kv_valid_shape", r"kv_valid must have shape \[B, Tk\]"),
        ("kv_valid_dtype", "kv_valid must have dtype torch.bool"),
        ("k", "k must have shape"),
        ("causal", "causal queries"),
    ],
)
def test_bad_input_names_the_argument(case: str, match: str) -> None:
    q, k, v, kv_valid = _inputs(Tq=2, Tk=9, d=8, valid=True, device="cpu")
    args = {
        "kv_valid_shape": (q, k, v, kv_valid[:, :5]),
        "kv_valid_dtype": (q, k, v, kv_valid.float()),
        "k": (q, k[..., :4], v, kv_valid),
        "causal": (torch.randn(2, 4, 12, 8), k, v, kv_valid),
    }[case]
    with pytest.raises(ValueError, match=match):
        torch.ops.mka.decode_attention(*args, 0.5, True)


def test_bad_num_splits() -> None:
    q, k, v, _ = _inputs(device="cpu")
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention_fwd(q, k, v, num_splits=0)


# ------------------------------------------------------------------------- the op on CUDA (dispatcher)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("B", "H", "Hkv", "Tq", "Tk", "d"), [(4, 32, 8, 1, 4099, 128), (2, 8, 1, 4, 1000, 80)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_op_long_cache(dtype, B, H, Hkv, Tq, Tk, d) -> None:
    q, k, v, kv_valid = _inputs(B, H, Hkv, Tq, Tk, d, valid=True, dtype=dtype, device="cuda")
    out, lse = decode_attention(q, k, v, kv_valid, causal=True, return_lse=True)
    ref_out, ref_lse = reference_decode_attention(q.float(), k.float(), v.float(), kv_valid, d**-0.5, True)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.float(), ref_out, **tol)
    torch.testing.assert_close(lse, ref_lse, **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_offsets_beyond_2_31() -> None:
    """Batch 1 starts 2**31 elements into the storage: every pointer offset must be 64-bit."""
    B, Hkv, Tk, d = 2, 2, 3000, 64
    big = torch.randn(2**31 + Hkv * Tk * d + 1000, dtype=torch.float16, device="cuda")  # 4 GiB (+ v's offset)
    k = big.as_strided((B, Hkv, Tk, d), (2**31, Tk * d, d, 1))
    v = big.as_strided((B, Hkv, Tk, d), (2**31, Tk * d, d, 1), 1000)
    q = torch.randn(B, 8, 1, d, dtype=torch.float16, device="cuda")
    out, lse = decode_attention_fwd(q, k, v, None, 0.125, True)
    ref_out, ref_lse = reference_decode_attention(q, k.contiguous(), v.contiguous(), None, 0.125, True)
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse, ref_lse, rtol=2e-2, atol=2e-2)
