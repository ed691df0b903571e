"""Triton session scan (``kernels/session_scan/triton_kernels.py``) against the pure-torch reference.

The launchers run on CPU tensors through the Triton interpreter (tiny shapes, small blocks so that T and d
span several tiles); the tests marked ``gpu`` go through the ``mka::`` dispatcher on CUDA tensors.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported; CPU tensors run interpreted in any case
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
ref = importlib.import_module("mka_compile.kernels.session_scan.reference")
tri = importlib.import_module("mka_compile.kernels.session_scan.triton_kernels")

BLOCKS = dict(BLOCK_T=16, BLOCK_D=4)


def _inputs(B=2, H=2, T=17, d=5, dtype=torch.float32, seed=0, bthd=False):
    """Op arguments without beta: random holes, row 0 starts with 3 pads and n_seen = 0, row 1 has n_seen = 7;
    ``bthd``: k/v are strided views of ``[B, T, H, d]`` storage."""
    g = torch.Generator().manual_seed(seed)

    def r():
        x = torch.randn(B, T, H, d, generator=g).transpose(1, 2) if bthd else torch.randn(B, H, T, d, generator=g)
        return x.to(dtype)

    k, v = r(), r()
    valid = torch.rand(B, T, generator=g) > 0.3
    valid[0, : min(3, T - 1)] = False
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    sk, sv = torch.randn(B, H, d, generator=g, dtype=sdt), torch.randn(B, H, d, generator=g, dtype=sdt)
    n_seen = torch.tensor([0] + [7] * (B - 1))
    return k, v, valid, sk, sv, n_seen


def _close(got, want, dtype) -> None:
    """Activation-dtype outputs within one rounding; states (always float32/64) tight."""
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        t = tol if i < 2 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.double(), b.double(), **t, msg=lambda m, i=i: f"output {i}: {m}")


@pytest.mark.parametrize("T", [1, 17, 45])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_and_backward_match_reference(T: int, dtype: torch.dtype) -> None:
    k, v, valid, sk, sv, n_seen = _inputs(T=T, dtype=dtype)
    out = tri.session_scan_fwd(k, v, valid, sk, sv, n_seen, 0.8, **BLOCKS)
    assert out[2].dtype == torch.float32
    _close(out, ref.reference_session_scan(k, v, valid, sk, sv, n_seen, 0.8), dtype)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(x.shape, generator=g).to(x.dtype) for x in out]
    got = tri.session_scan_bwd(*grads, valid, n_seen, 0.8, **BLOCKS)
    _close(got, ref.reference_session_scan_backward(*grads, k, v, valid, sk, sv, n_seen, 0.8), dtype)


def test_strided_inputs_default_blocks_and_float64_state() -> None:
    k, v, valid, sk, sv, n_seen = _inputs(T=45, d=6, bthd=True, dtype=torch.float64)
    assert not k.is_contiguous()
    out = tri.session_scan_fwd(k, v, valid, sk, sv, n_seen, 0.9)
    want = ref.reference_session_scan(k, v, valid, sk, sv, n_seen, 0.9)
    assert out[2].dtype == torch.float64
    _close(out, want, torch.float64)  # beta reaches the kernel as float32: ~1e-8 relative
    grads = [x.transpose(2, 3).contiguous().transpose(2, 3) if x.dim() == 4 else x for x in want]
    got = tri.session_scan_bwd(*grads, valid, n_seen, 0.9)
    _close(got, ref.reference_session_scan_backward(*grads, k, v, valid, sk, sv, n_seen, 0.9), torch.float64)


def test_padding_only_call_keeps_state() -> None:
    k, v, valid, sk, sv, n_seen = _inputs(T=5)  # row 0 has n_seen = 0
    valid[:] = False
    out = tri.session_scan_fwd(k, v, valid, sk, sv, n_seen, 0.9, **BLOCKS)
    s_k, _, st_k, st_v = out
    torch.testing.assert_close(st_k, sk)
    torch.testing.assert_close(st_v, sv)
    torch.testing.assert_close(s_k, sk[:, :, None].expand_as(s_k))
    got = tri.session_scan_bwd(*out, valid, n_seen, 0.9, **BLOCKS)
    _close(got, ref.reference_session_scan_backward(*out, k, v, valid, sk, sv, n_seen, 0.9), torch.float32)
    assert got[0].abs().max() == 0


def test_cuda_kernels_registered_and_take_op_arguments() -> None:
    for op in ("mka::session_scan", "mka::session_scan_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
    args = _inputs(T=3)  # the CUDA implementations, called as the dispatcher would (on CPU tensors here)
    out = tri._session_scan_cuda(*args, 0.9)
    _close(out, ref.reference_session_scan(*args, 0.9), torch.float32)
    got = tri._session_scan_backward_cuda(*out, *args, 0.9)
    _close(got, ref.reference_session_scan_backward(*out, *args, 0.9), torch.float32)
    with pytest.raises(ValueError, match="beta"):
        tri._session_scan_cuda(*args, 1.5)


# ------------------------------------------------------------------------------------------ GPU, dispatcher


@pytest.mark.parametrize(("dtype", "T", "d"), [(torch.float32, 333, 64), (torch.bfloat16, 1000, 128)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_dispatch_forward_backward(dtype: torch.dtype, T: int, d: int) -> None:
    args = _inputs(B=2, H=4, T=T, d=d, dtype=dtype, bthd=True)
    dev = [a.to("cuda") for a in args]
    for i in (0, 1, 3, 4):
        dev[i].requires_grad_()
    out = torch.ops.mka.session_scan(*dev, 0.9)
    _close([o.cpu() for o in out], ref.reference_session_scan(*args, 0.9), dtype)
    grads = [torch.randn_like(o) for o in out]
    got = torch.autograd.grad(out, [dev[0], dev[1], dev[3], dev[4]], grads)
    want = ref.reference_session_scan_backward(*[g.cpu() for g in grads], *args, 0.9)
    _close([x.cpu() for x in got], want, dtype)
