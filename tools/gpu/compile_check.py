"""Compile every Triton kernel (memory path and attention) for a GPU target on a machine without a GPU.

The interpreter tests check the kernels' arithmetic; this checks that they also *compile* (types of
loop-carried values, constexpr specialisation of arguments equal to 1, layouts, register use) for a CUDA
target, through Triton's own pipeline down to a cubin (Triton ships ptxas). The launchers run on CPU
tensors with their launch intercepted: each launch is compiled with the argument types and values it
would have had on a GPU, and the table lists registers, spills and shared memory per kernel.

    python tools/gpu/compile_check.py [--arch 90]
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile the kernels: with it set, triton.jit would define them interpreted

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mka_compile.kernels.bounded_attention import triton_backward as bb
from mka_compile.kernels.bounded_attention import triton_kernels as bk
from mka_compile.kernels.longterm import triton_kernels as lt
from mka_compile.kernels.mka_attention import triton_launch as mt
from mka_compile.kernels.session_scan import triton_kernels as ss

fa = importlib.import_module("mka_compile.kernels.flash_attention")  # the package (the name is also a function)

_TY = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.uint8: "u8",
}


def _resources(kernel) -> str:
    """Registers and spill stack from ``cuobjdump``; shared memory from Triton's metadata (the dynamic shared
    memory the launch asks for: ``cuobjdump`` lists only static shared memory)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(kv.split(":") for line in out.splitlines() if "REG:" in line for kv in line.split())
    shared = getattr(kernel.metadata, "shared", None)
    shared = "?" if shared is None else f"{shared / 1024:.0f}K"
    return f"regs {fields.get('REG', '?'):>3}  stack {fields.get('STACK', '?'):>5}  shared {shared:>4}"


def _type(v, path: tuple[int, ...], consts: dict) -> str:
    """The signature type of one launch argument (``path``: its place, an index into a tuple argument included),
    recording ints equal to 1 as constants, as the launcher specialises them."""
    if isinstance(v, int) and not isinstance(v, bool) and v == 1:
        consts[path] = v
        return "constexpr"
    if isinstance(v, torch.Tensor):
        return "*" + _TY[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -(2**31) <= v < 2**31 else "i64"
    return "fp32"


class _Compile:
    """Stands in for ``for_device(kernel, device)``: ``[grid](*args, **meta)`` compiles instead of launching."""

    rows: list[tuple[str, str, str]] = []
    case = ""
    target = GPUTarget("cuda", 90, 32)

    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __getitem__(self, grid):
        def run(*args, num_warps: int = 4, num_stages: int = 3, **meta):
            values = dict(zip(self.kernel.arg_names, args), **meta)
            sig, consts = {}, {}
            for i, (p, name) in enumerate(zip(self.kernel.params, self.kernel.arg_names)):
                v = values[name]
                if p.is_constexpr:
                    sig[name], consts[(i,)] = "constexpr", v
                elif isinstance(v, tuple):  # a tuple of strides: each element is specialised as a scalar is
                    sig[name] = tuple(_type(v[j], (i, j), consts) for j in range(len(v)))
                else:
                    sig[name] = _type(v, (i,), consts)
            try:
                k = triton.compile(
                    ASTSource(self.kernel, sig, consts),
                    target=self.target,
                    options={"num_warps": num_warps, "num_stages": num_stages},
                )
                self.rows.append((self.kernel.__name__, self.case, _resources(k)))
            except Exception as e:  # reported in the table
                self.rows.append((self.kernel.__name__, self.case, "FAILED: " + repr(e)[:2000]))

        return run


def _rand(*shape, dtype=torch.float32, bthd=False):
    if bthd:  # [B, H, T, d] view of [B, T, H, d] storage
        b, h, t, d = shape
        return torch.randn(b, t, h, d).transpose(1, 2).to(dtype)
    return torch.randn(*shape).to(dtype)


def _gpu_configs(table, x, bd, block_m, block_n, num_warps, num_stages):
    """``plumbing.configs_for`` as on a GPU (CPU tensors would get the interpreter's tiles): the first config
    of the table (the one a GPU tries first), or the overrides."""
    es = 2 if x.element_size() == 2 else 4
    bm, bn, w, st = table[(es, max(64, bd))][0]
    return [(block_m or bm, block_n or bn, num_warps or w, num_stages or st)], False


def run_cases(dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)) -> None:
    B, H, d = 2, 4, 128
    for dt in dtypes:
        for T in (1, 300):
            _Compile.case = f"{str(dt)[6:]} T={T}"
            k, v = _rand(B, H, T, d, dtype=dt, bthd=True), _rand(B, H, T, d, dtype=dt, bthd=True)
            valid = torch.rand(B, T) > 0.2
            st = [torch.zeros(B, H, d), torch.zeros(B, H, d)]
            n = torch.tensor([0, 5])
            ss.session_scan_fwd(k, v, valid, *st, n, 0.9)
            g = [_rand(B, H, T, d, dtype=dt), _rand(B, H, T, d, dtype=dt), *st]
            ss.session_scan_bwd(*g, valid, n, 0.9, dt, torch.float32)
            _Compile.case = f"{str(dt)[6:]} T={T} C=16"
            lt.chunk_update_fwd(k, v, valid, n, *st, torch.zeros(B, H, 40, d), torch.zeros(B, H, 40, d), 16)
    for dt in dtypes:  # attention kernels: GQA (8 query heads on 2 kv heads), causal
        T = 300
        q, k, v = _rand(B, 8, T, d, dtype=dt), _rand(B, 2, T, d, dtype=dt), _rand(B, 2, T, d, dtype=dt)
        _Compile.case = f"{str(dt)[6:]} flash T={T} causal"
        out, lse = torch.zeros_like(q), torch.zeros(B, 8, T)
        fa.flash_attention_fwd(q, k, v, None, None, True)  # the GPU's default tiles (see _gpu_configs)
        fa.flash_attention_bwd(q, q, k, v, out, lse, None, None, True)
        _Compile.case = f"{str(dt)[6:]} mka T={T} R=8"
        lam = torch.softmax(torch.randn(B, 1, T, 3), -1)
        idx = torch.randint(0, 16, (B, 2, T, 8))
        margs = (
            q,
            [k, k],
            [v, v],
            lam,
            q,
            torch.randn(B, 2, 16, d),
            torch.randn(B, 2, 16, d),
            idx,
            torch.ones(B, 2, T, 8, dtype=torch.bool),
            torch.ones(B, T, dtype=torch.bool),
            d**-0.5,
            True,
        )
        mt.mka_attention_fwd(*margs)
        mt.mka_attention_bwd(q, *margs, lse=torch.zeros(B, 8, 3, T), levels=torch.zeros(B, 8, 3, T, d))
    for dt in dtypes:  # bounded attention: a decode step and a prefill block, keys moved
        for T, M in ((1, 4 + 8 * 64 + 1024 + 63), (300, 4 + 4 * 64)):
            _Compile.case = f"{str(dt)[6:]} bounded T={T} M={M}"
            q, k, v = _rand(B, 8, T, d, dtype=dt), _rand(B, 2, 2000, d, dtype=dt), _rand(B, 2, 2000, d, dtype=dt)
            idx = torch.randint(-1, 2000, (B, 2, T, M))
            delta = torch.randint(-500, 500, (B, 2, T, M))
            freqs = 1.0 / (10000.0 ** (torch.arange(d // 2, dtype=torch.float32) * 2 / d))
            args = (q, k, v, idx, delta, freqs, d**-0.5, False)
            bk.bounded_attention_fwd(*args)
            bb.bounded_attention_bwd(q, torch.zeros(B, 8, T), *args)
    pos = torch.arange(300).expand(B, 300).contiguous()
    for R, bank in ((8, True), (32, False)):
        _Compile.case = f"recall R={R} bank={bank}"
        bank_k = torch.randn(B, H, 30, d).bfloat16() if bank else None
        bank_valid = torch.rand(B, 30) > 0.5 if bank else None
        lt.recall_select_fwd(_rand(B, H, 300, d, bthd=True), torch.randn(B, H, 50, d), pos, 16, R, bank_k, bank_valid)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="only this dtype's cases (default: both)")
    ns = parser.parse_args()
    _Compile.target = GPUTarget("cuda", ns.arch, 32)
    for mod in (ss, lt, mt, bk, bb):
        mod.for_device = lambda kernel, device: _Compile(kernel)
    for mod in (fa, importlib.import_module("mka_compile.kernels.flash_attention.plumbing")):
        mod.launchable = lambda kernel, device: _Compile(kernel)
    fa.configs_for = _gpu_configs
    compiled_meta = mt._dot_meta  # compile as for a GPU: no interpreter-only bf16 upcast
    mt._dot_meta = lambda q, allow_tf32: {**compiled_meta(q, allow_tf32), "DOT_UPCAST": False}
    run_cases((getattr(torch, ns.dtype),) if ns.dtype else (torch.float32, torch.bfloat16))
    failed = 0
    for name, case, res in _Compile.rows:
        failed += res.startswith("FAILED")
        print(f"{name:28s} {case:36s} {res}")
    print(f"{len(_Compile.rows) - failed} compiled, {failed} failed (sm_{ns.arch})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
