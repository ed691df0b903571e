"""Launch plumbing of the flash-attention family: tile configs per dtype and head size, the first config
that fits the device, CPU tensors through the Triton interpreter, mask and scale arguments."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

try:  # triton is optional (Linux-only)
    import triton

    from .. import _triton
except ModuleNotFoundError as _err:  # pragma: no cover - exercised only where triton is missing
    if _err.name != "triton":
        raise
    triton = _triton = None

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per (element size, padded head dim), tried in order until one
# fits the GPU (OutOfResources = too much shared memory); the first that fits is remembered per key.
# bf16/fp16 d=128 heads lead with the winners of `tools/gpu/check.py --sweep` on an H200 (docs/benchmarks.md).
Config = tuple[int, int, int, int]
FWD_CONFIGS: dict[tuple[int, int], list[Config]] = {
    (2, 64): [(128, 64, 4, 3), (64, 64, 4, 2), (32, 32, 4, 1)],
    (2, 128): [(128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2), (32, 32, 4, 1)],  # H200 sweep: 128x128 best
    (2, 256): [(64, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 1)],
    (4, 64): [(64, 64, 4, 2), (32, 32, 4, 1)],
    (4, 128): [(64, 32, 4, 2), (32, 32, 4, 1)],
    (4, 256): [(32, 32, 4, 1), (16, 16, 4, 1)],
}
DKDV_CONFIGS: dict[tuple[int, int], list[Config]] = {  # BLOCK_M query rows x BLOCK_N keys per program
    (2, 64): [(32, 128, 8, 3), (32, 64, 4, 2), (16, 32, 4, 1)],
    (2, 128): [(64, 64, 4, 2), (32, 64, 8, 3), (32, 32, 4, 2), (16, 32, 4, 1)],  # H200 sweep: 2x faster bwd
    (2, 256): [(16, 32, 8, 2), (16, 16, 4, 1)],
    (4, 64): [(32, 64, 4, 2), (16, 32, 4, 1)],
    (4, 128): [(32, 32, 4, 2), (16, 32, 4, 1)],
    (4, 256): [(16, 32, 8, 1), (16, 16, 4, 1)],
}
DQ_CONFIGS: dict[tuple[int, int], list[Config]] = {
    (2, 64): [(128, 32, 8, 3), (64, 32, 4, 2), (32, 16, 4, 1)],
    (2, 128): [(64, 32, 4, 3), (32, 32, 4, 2), (16, 16, 4, 1)],
    (2, 256): [(32, 32, 8, 2), (16, 16, 4, 1)],
    (4, 64): [(64, 32, 4, 2), (32, 16, 4, 1)],
    (4, 128): [(32, 32, 4, 2), (16, 16, 4, 1)],
    (4, 256): [(16, 32, 8, 1), (16, 16, 4, 1)],
}
INTERPRETER_CONFIG: Config = (32, 32, 1, 1)  # CPU tensors: fewer, bigger programs run faster interpreted
_CHOSEN: dict[tuple, Config] = {}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_d(d: int) -> int:
    """Head dim padded to a power of two >= 16 (``tl.dot`` needs K >= 16)."""
    return _triton.pow2(d, lo=16)


def configs_for(
    table: dict[tuple[int, int], list[Config]],
    x: torch.Tensor,
    bd: int,
    block_m: int | None,
    block_n: int | None,
    num_warps: int | None,
    num_stages: int | None,
) -> tuple[list[Config], bool]:
    """Candidate configs for ``x``'s device and dtype, and whether the choice may be cached (no override)."""
    if x.device.type == "cpu":
        base = [INTERPRETER_CONFIG]
    else:
        base = table[(2 if x.element_size() == 2 else 4, max(64, bd))]
    if block_m is None and block_n is None and num_warps is None and num_stages is None:
        return base, x.device.type != "cpu"
    bm, bn, w, st = base[0]
    return [(block_m or bm, block_n or bn, num_warps or w, num_stages or st)], False


_AS_JIT: dict[int, object] = {}


def launchable(kernel, device: torch.device):
    """``_triton.for_device`` (CPU tensors: the Triton interpreter, with nested ``@jit`` calls such as
    ``tl.max`` interpreted too), also for a kernel that was *defined* interpreted (``TRITON_INTERPRET`` set
    after triton's first import, e.g. by an earlier test module) while triton's own helpers stayed
    compiled: such a kernel is re-wrapped as a ``JITFunction`` so ``for_device`` patches its nested calls."""
    import triton

    if device.type == "cpu" and not isinstance(kernel, triton.runtime.JITFunction):
        if id(kernel) not in _AS_JIT:
            _AS_JIT[id(kernel)] = triton.runtime.JITFunction(kernel.fn)
        kernel = _AS_JIT[id(kernel)]
    return _triton.for_device(kernel, device)


def device_scope(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it ``x``'s."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def launch(
    kernel,
    x: torch.Tensor,
    grid: Callable[[int, int], tuple[int, ...]],
    args: tuple,
    consts: dict,
    configs: list[Config],
    cache_key: tuple | None,
) -> None:
    """``kernel[grid(BLOCK_M, BLOCK_N)](*args, **consts, BLOCK_M=.., BLOCK_N=.., num_warps=.., num_stages=..)``
    with the first config the device accepts; CPU tensors run the Triton interpreter."""
    from triton.runtime.errors import OutOfResources

    run = launchable(kernel, x.device)
    tried = [_CHOSEN[cache_key]] if cache_key in _CHOSEN else configs
    for i, (bm, bn, warps, stages) in enumerate(tried):
        try:
            run[grid(bm, bn)](*args, **consts, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        except OutOfResources:
            if i == len(tried) - 1:
                raise
            continue
        if cache_key is not None:
            _CHOSEN[cache_key] = (bm, bn, warps, stages)
        return


def dot_precision(x: torch.Tensor) -> str:
    """``tl.dot`` input precision: float32 inputs follow torch's TF32 switch; half inputs ignore it."""
    if x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _mask_args(mask: torch.Tensor | None, q: torch.Tensor, B: int, H: int, Tq: int, Tk: int):
    """``(MASK_KIND, tensor, strides)``: broadcast dims get stride 0; bool masks are read as bytes."""
    if mask is None:
        return 0, q, (0, 0, 0, 0)
    m = mask.expand(B, H, Tq, Tk)  # (B, H, Tq, Tk), a view
    return (1 if mask.dtype == torch.bool else 2), _triton.as_bytes(m), m.stride()


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return float(q.shape[-1] ** -0.5 if scale is None else scale)
