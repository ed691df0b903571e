"""Triton plumbing shared by the families' Triton kernel modules.

``triton.jit`` decides between compiling and interpreting when a kernel is *defined*, from
``TRITON_INTERPRET``. The package defines its kernels at import, often before a test could set that
variable, so the launchers pick the kernel per call instead: tensors on the CPU always run the
Triton interpreter (whatever ``TRITON_INTERPRET`` said), tensors on a GPU the compiled kernel. The
CPU tests therefore pass in any import order, and CPU interpreter tests can share a process with
compiled GPU tests.

The kernels take a tensor's strides as one tuple argument (``x.stride()``), indexed in the kernel
(``stride_x[0]``); :func:`load_head_tile` / :func:`store_head_tile` address one head of a ``[B, H, T, d]`` tensor
through such a tuple.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import triton
import triton.language as tl

_INTERPRETED: dict[int, _Interpreted] = {}
_LOCK = threading.RLock()


@contextlib.contextmanager
def _nested_calls_interpreted():
    """While an interpreted launch runs, a call to a compiled-mode ``@triton.jit`` function (triton's own
    ``tl.sum``, ``tl.cumsum``... are such functions when triton was imported without ``TRITON_INTERPRET``)
    runs interpreted too, as it would had ``TRITON_INTERPRET`` been set before triton was imported."""
    cls = triton.runtime.JITFunction
    with _LOCK:
        original = cls.__call__
        cls.__call__ = lambda self, *args, **kwargs: _interpreted(self).fn(*args, **kwargs)
        try:
            yield
        finally:
            cls.__call__ = original


class _Interpreted:
    """``kernel[grid](...)`` through the Triton interpreter, for a kernel defined in compiled mode."""

    def __init__(self, kernel) -> None:
        from triton.runtime.interpreter import InterpretedFunction

        self.fn = InterpretedFunction(kernel.fn)

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            with _nested_calls_interpreted():
                return self.fn[grid](*args, **kwargs)

        return run


def _interpreted(kernel) -> _Interpreted:
    fn = _INTERPRETED.get(id(kernel))
    if fn is None:
        fn = _INTERPRETED[id(kernel)] = _Interpreted(kernel)
    return fn


def for_device(kernel, device: torch.device):
    """The launchable form of ``kernel`` for tensors on ``device``: ``for_device(k, dev)[grid](*args)``.

    CPU tensors run the Triton interpreter; other devices the kernel as defined (compiled, or interpreted
    when ``TRITON_INTERPRET=1`` was set before the kernel module was imported)."""
    if device.type == "cpu" and isinstance(kernel, triton.runtime.JITFunction):
        return _interpreted(kernel)
    return kernel


def pow2(n: int, lo: int = 1, hi: int | None = None) -> int:
    """``next_power_of_2(n)`` clamped to ``[lo, hi]``."""
    p = max(lo, triton.next_power_of_2(max(1, int(n))))
    return p if hi is None else min(p, hi)


def as_bytes(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor viewed as uint8 (same storage), so kernels read/write it as 0/1 bytes."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


@triton.jit
def load_tile(base, rows, stride_r, cols, stride_c, mask):
    """The ``[rows, cols]`` tile of the 2-D slice at ``base`` with strides ``(stride_r, stride_c)`` (``rows``,
    ``cols``: 1-D offsets, int64 where the tensor may pass 2**31 elements), 0 where ``mask`` is False."""
    return tl.load(base + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0)


@triton.jit
def store_tile(base, rows, stride_r, cols, stride_c, x, mask):
    """Store ``x`` (cast to the element type of ``base``) into the tile :func:`load_tile` reads."""
    tl.store(base + rows[:, None] * stride_r + cols[None, :] * stride_c, x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def load_head_tile(base, strides, b, h, rows, cols, mask):
    """:func:`load_tile` of head ``h`` of batch ``b`` of a ``[B, H, T, d]`` tensor at ``base`` (``strides``: its
    four strides, a tuple)."""
    return load_tile(base + b * strides[0] + h * strides[1], rows, strides[2], cols, strides[3], mask)


@triton.jit
def store_head_tile(base, strides, b, h, rows, cols, x, mask):
    """Store ``x`` into the tile :func:`load_head_tile` reads."""
    store_tile(base + b * strides[0] + h * strides[1], rows, strides[2], cols, strides[3], x, mask)
