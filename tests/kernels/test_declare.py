"""The op declaration helper (``mka_compile.kernels.declare``) on two toy ops in a test namespace: the schemas it
infers and derives, the fake, the autograd (lists, optional tensors, saved outputs, missing gradients), the CUDA
registration's fallback and the errors it raises before registering anything."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

from mka_compile.kernels._grads import new_like
from mka_compile.kernels.declare import Backward, declare


def reference_axpy(x: torch.Tensor, ys: list[torch.Tensor], alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``u = alpha x + sum(ys)``, ``s = x.sum(-1)``."""
    return alpha * x + sum(ys), x.sum(-1)


def reference_axpy_backward(grad_u, grad_s, x, ys, alpha):
    return alpha * grad_u + grad_s[..., None], [grad_u.clone() for _ in ys]


def check_axpy(x, ys, alpha) -> None:
    if any(y.shape != x.shape for y in ys):
        raise ValueError("ys must be shaped like x")


def _no_negative_alpha(x, ys, alpha) -> None:
    if alpha < 0:
        raise ValueError("alpha must be >= 0")


AXPY = declare(
    "mka_test::axpy",
    reference_axpy,
    check=check_axpy,
    check_values=_no_negative_alpha,
    fake=lambda x, ys, alpha: (new_like(x), x.new_empty(x.shape[:-1])),
    backward=Backward(reference_axpy_backward, outputs=("u", "s"), wrt=("x", "ys")),
)

SEEN_GRAD_TOTAL = []


def reference_expsum(
    x: torch.Tensor, mask: torch.Tensor | None, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``e = exp(scale x)`` (0 where ``mask`` is False), ``total = e.sum(-1)``."""
    e = torch.exp(scale * x)
    e = e if mask is None else e * mask
    return e, e.sum(-1)


def reference_expsum_backward(grad_e, grad_total, x, mask, e, scale):
    SEEN_GRAD_TOTAL.append(grad_total)
    g = grad_e if grad_total is None else grad_e + grad_total[..., None]
    return scale * e * g


EXPSUM = declare(
    "mka_test::expsum",
    reference_expsum,
    fake=lambda x, mask, scale: (new_like(x), x.new_empty(x.shape[:-1])),
    backward=Backward(
        reference_expsum_backward,
        outputs=("e", "total"),
        wrt=("x",),
        params=("grad_e", "grad_total", "x", "mask", "e", "scale"),
        optional_grads=("total",),
    ),
)


def test_schemas_are_inferred_and_derived() -> None:
    assert str(torch.ops.mka_test.axpy.default._schema) == (
        "mka_test::axpy(Tensor x, Tensor[] ys, float alpha) -> (Tensor, Tensor)"
    )
    assert str(torch.ops.mka_test.axpy_backward.default._schema) == (
        "mka_test::axpy_backward(Tensor grad_u, Tensor grad_s, Tensor x, Tensor[] ys, float alpha)"
        " -> (Tensor, Tensor[])"
    )
    assert str(torch.ops.mka_test.expsum_backward.default._schema) == (
        "mka_test::expsum_backward(Tensor grad_e, Tensor? grad_total, Tensor x, Tensor? mask, Tensor e, float scale=1.)"
        " -> Tensor"
    )
    assert AXPY.backward.name == "mka_test::axpy_backward"


def test_opcheck_and_gradcheck() -> None:
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    ys = [torch.randn(2, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    opcheck(torch.ops.mka_test.axpy.default, (x, ys, 0.5))
    torch.autograd.gradcheck(lambda x, a, b: torch.ops.mka_test.axpy(x, [a, b], 0.5), (x, *ys))
    mask = torch.rand(2, 3) > 0.3
    opcheck(torch.ops.mka_test.expsum.default, (x, mask, 0.7))
    opcheck(torch.ops.mka_test.expsum.default, (x, None, 0.7))
    torch.autograd.gradcheck(lambda x: torch.ops.mka_test.expsum(x, mask.double(), 0.7), (x,))
    opcheck(torch.ops.mka_test.expsum.default, (x, mask))  # the default scale: left out by the dispatcher
    torch.autograd.gradcheck(lambda x: torch.ops.mka_test.expsum(x, None), (x,))


def test_unused_outputs() -> None:
    x = torch.randn(2, 3, requires_grad=True)
    y = torch.randn(2, 3, requires_grad=True)
    u, _ = torch.ops.mka_test.axpy(x, [y], 2.0)  # s unused: its gradient reaches the backward as zeros
    u.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
    torch.testing.assert_close(y.grad, torch.ones_like(y))
    SEEN_GRAD_TOTAL.clear()
    e, _ = torch.ops.mka_test.expsum(x, None, 1.0)  # total unused (autograd hands zeros; None would pass as None)
    x.grad = None
    e.sum().backward()
    assert len(SEEN_GRAD_TOTAL) == 1 and (SEEN_GRAD_TOTAL[0] is None or not SEEN_GRAD_TOTAL[0].any())
    torch.testing.assert_close(x.grad, torch.exp(x.detach()))


def test_checks_run_in_the_implementation_and_the_fake() -> None:
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="ys must be shaped like x"):
        torch.ops.mka_test.axpy(x, [torch.randn(3)], 1.0)
    with pytest.raises(ValueError, match="alpha"):
        torch.ops.mka_test.axpy(x, [x], -1.0)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        u, s = torch.ops.mka_test.axpy(torch.empty(2, 3), [torch.empty(2, 3)], -1.0)  # no data: no value checks
        assert u.shape == (2, 3) and s.shape == (2,)
        with pytest.raises(ValueError, match="ys must be shaped like x"):
            torch.ops.mka_test.axpy(torch.empty(2, 3), [torch.empty(3)], 1.0)


def test_cuda_implementation_falls_back_and_checks() -> None:
    calls = []

    @AXPY.implement_cuda(supported=lambda x, ys, alpha: x.dtype == torch.float32)
    def axpy_cuda(x, ys, alpha):
        calls.append(x.dtype)
        return reference_axpy(x, ys, alpha)

    assert torch._C._dispatch_has_kernel_for_dispatch_key("mka_test::axpy", "CUDA")
    x = torch.randn(2, 3)
    axpy_cuda(x, [x], 1.0)
    axpy_cuda(x.double(), [x.double()], 1.0)  # not supported: the CPU implementation
    assert calls == [torch.float32]
    with pytest.raises(ValueError, match="alpha"):  # the op's checks (values included) run before the launcher
        axpy_cuda(x, [x], -1.0)


def test_bad_descriptions_fail_before_registering() -> None:
    with pytest.raises(ValueError, match="'grad_nope' is no grad_<output>"):
        declare(
            "mka_test::bad",
            reference_axpy,
            fake=lambda *a: None,
            backward=Backward(reference_axpy_backward, ("u", "s"), ("x",), params=("grad_nope", "x")),
        )
    with pytest.raises(ValueError, match="differentiates 'w'"):
        declare("mka_test::bad", reference_axpy, fake=lambda *a: None, backward=Backward(abs, ("u", "s"), ("w",)))
    with pytest.raises(ValueError, match="returns 2 outputs but the backward names 1"):
        declare("mka_test::bad", reference_axpy, fake=lambda *a: None, backward=Backward(abs, ("u",), ("x",)))
    assert not hasattr(torch.ops.mka_test, "bad")
