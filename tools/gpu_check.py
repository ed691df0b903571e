"""One-call GPU check: every Triton kernel against its reference, then timed against PyTorch SDPA (flash).

    python tools/gpu_check.py                      # on a CUDA machine: checks, timings, table last
    python tools/gpu_check.py --out $OUT           # also writes details (JSON) there
    python tools/gpu_check.py --smoke              # tiny sizes; on CPU runs the Triton interpreter
    python tools/gpu_check.py --sweep --out $OUT   # + tile sweep per kernel (sweep.txt); the table still last
    python tools/gpu_check.py --sweep-only flash_fwd,decode   # just these kernels' sweeps
    bash tools/gpu_run.sh                          # on a GPU machine without the package installed

The sweep times a small grid of tile configs per Triton kernel (flash forward, flash backward dK/dV and
dQ, split-K decode, FastMKA mix, MKA forward and backward) at the goal size within --sweep-budget seconds,
skips configs that do not compile or fit (recording why), checks the fastest against the reference and
against the default's output, and reports the best next to the default. With --sweep the checks, timings
and goals are printed before the sweep and again after it, so they close the output even if the sweep is
cut short; results are written to gpu_check.json after every step.

Timings: CUDA events, median of ``--reps`` after warm-up, all candidates of a comparison measured in the
same run. FLOPs and bytes are counted per call (causal attention counts half the score matrix).
Targets (issue 5, H200, bf16, causal, d=128): FastMKA attention (scan + route-mix + RoPE + our flash) at
>= 0.90x the speed of SDPA-flash at T=8192; our flash forward >= 450 TFLOP/s; MKA <= 1.6x one SDPA pass;
decode per token <= 1.05x the base model's.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import mka_compile.kernels  # noqa: F401  (registers the ops and their CUDA kernels)

fa = importlib.import_module("mka_compile.kernels.flash_attention")
da = importlib.import_module("mka_compile.kernels.decode_attention")
ma = importlib.import_module("mka_compile.kernels.mka_attention")
mt = importlib.import_module("mka_compile.kernels.mka_attention_triton")
ss = importlib.import_module("mka_compile.kernels.session_scan")
st = importlib.import_module("mka_compile.kernels.session_scan_triton")
fm = importlib.import_module("mka_compile.kernels.fastmka_mix")
fmt = importlib.import_module("mka_compile.kernels.fastmka_mix_triton")
lt = importlib.import_module("mka_compile.kernels.longterm")
ltt = importlib.import_module("mka_compile.kernels.longterm_triton")


def timer(dev: torch.device, reps: int) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of ``fn`` (CUDA events on GPU, perf_counter on CPU); nan if it raises."""

    def run(fn: Callable[[], object]) -> float:
        try:
            return bench(dev, fn, max(2, reps // 10) + 1, reps)[0]
        except Exception as e:  # noqa: BLE001  (the row shows nan; the other timings still run)
            print(f"timing FAILED: {type(e).__name__}: {str(e)[:500]}", flush=True)
            return math.nan

    return run


def sdpa_flash(q, k, v, causal=True):
    """PyTorch SDPA restricted to its flash backend on CUDA (any backend on CPU)."""
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def attn_flops(B, H, Tq, Tk, d, causal) -> float:
    frac = 0.5 if causal and Tq == Tk else 1.0
    return 4.0 * B * H * Tq * Tk * d * frac


def checks(dev, dtype, s) -> list[dict]:
    """Each kernel against its reference at moderate sizes (odd lengths, GQA). A kernel that raises is
    recorded as failed (with the error) and the others still run."""
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g).to(dev, dtype)  # noqa: E731
    B, H, Hkv, T, d = 2, s["H"], max(1, s["H"] // 4), s["T_check"], s["d"]
    out = []
    tol = 2e-2 if dtype != torch.float32 else 1e-4

    def add(name, fn):
        try:
            err = float(fn())
            out.append({"kernel": name, "rel_err": err, "ok": err <= tol})
        except Exception as e:  # noqa: BLE001  (reported; the other kernels are still checked)
            out.append({"kernel": name, "rel_err": math.nan, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000]})
            print(f"check {name} FAILED: {type(e).__name__}: {str(e)[:500]}", flush=True)

    q, k, v = r(B, H, T, d), r(B, Hkv, T, d), r(B, Hkv, T, d)
    qq = q[:, :, -3:]
    valid = torch.ones(B, T, dtype=torch.bool, device=dev)
    valid[1, :5] = False
    sk = torch.zeros(B, Hkv, d, device=dev)
    n0 = torch.zeros(B, dtype=torch.int64, device=dev)
    lam = torch.softmax(r(B, 1, T, 2).float(), -1)
    C, N = 16, T // 16 + 1
    st_args = (
        torch.zeros(B, Hkv, d, device=dev),
        torch.zeros(B, Hkv, d, device=dev),
        torch.zeros(B, Hkv, N, d, device=dev),
        torch.zeros(B, Hkv, N, d, device=dev),
    )
    pos = lt.real_positions(valid, n0)
    summ = r(B, Hkv, N, d).float()
    q_r = q.view(B, Hkv, H // Hkv, T, d).mean(2)
    lam3 = torch.softmax(r(B, 1, T, 3).float(), -1)
    q3 = r(B, H, T, d)
    idx3 = torch.randint(0, N, (B, Hkv, T, 4), generator=g).to(dev)
    found3 = torch.rand(B, Hkv, T, 4, generator=g).to(dev) > 0.3
    mem = (r(B, Hkv, N, d).float(), r(B, Hkv, N, d).float())
    args = (q, [k, k * 0.5], [v, v * 0.5], lam3, q3, *mem, idx3, found3, valid, d**-0.5, True)
    go = r(B, H, T, d)

    def recall():
        idx, found = ltt.recall_select_fwd(q_r, summ, pos, C, 4)
        ridx, rfound = lt.reference_recall_select(q_r, summ, pos, C, 4)
        return 1.0 - float((lt.recall_mask(idx, found, N) == lt.recall_mask(ridx, rfound, N)).float().mean())

    def flash_bwd():
        o, lse = fa.flash_attention_fwd(q, k, v, None, None, True)
        dq = fa.flash_attention_bwd(go, q, k, v, o, lse, None, None, True)[0]
        qr = q.detach().float().requires_grad_()
        ref = fa.reference_flash_attention(qr, k.float(), v.float(), None, d**-0.5, True)[0]
        (ref * go.float()).sum().backward()
        return rel_err(dq, qr.grad)

    add(
        "flash fwd (GQA, causal)",
        lambda: rel_err(
            fa.flash_attention_fwd(q, k, v, None, None, True)[0],
            fa.reference_flash_attention(q, k, v, None, d**-0.5, True)[0],
        ),
    )
    add(
        "decode split-K (3 queries)",
        lambda: rel_err(
            da.decode_attention_fwd(qq, k, v, None, None, True)[0],
            da.reference_decode_attention(qq, k, v, None, d**-0.5, True)[0],
        ),
    )
    add(
        "session scan fwd",
        lambda: rel_err(
            st.session_scan_fwd(k, v, valid, sk, sk.clone(), n0, 0.9)[0],
            ss.reference_session_scan(k, v, valid, sk, sk.clone(), n0, 0.9)[0],
        ),
    )
    add(
        "fastmka mix fwd",
        lambda: rel_err(
            fmt.fastmka_mix_fwd(lam, k, v, None, None, valid, sk, sk.clone(), n0, 0.9)[0],
            fm.reference_fastmka_mix(lam, k, v, None, None, valid, sk, sk.clone(), n0, 0.9)[0],
        ),
    )
    add(
        "chunk update fwd",
        lambda: rel_err(
            ltt.chunk_update_fwd(k, v, valid, n0, *st_args, C)[2],
            lt.reference_chunk_update(k, v, valid, n0, *st_args, C)[2],
        ),
    )
    add("recall select fwd (top-4)", recall)
    add("mka attention fwd", lambda: rel_err(mt.mka_attention_fwd(*args)[0], ma.reference_mka_attention(*args)))
    add(
        "mka attention bwd (dq)",
        lambda: rel_err(mt.mka_attention_bwd(go, *args)[0], ma.reference_mka_attention_backward(go, *args)[0]),
    )
    add("flash bwd (dq)", flash_bwd)
    return out


def timings(dev, dtype, s, reps) -> list[dict]:
    t = timer(dev, reps)
    B, H, T, d = s["B"], s["H"], s["T"], s["d"]
    r = lambda *shape: torch.randn(*shape, device=dev, dtype=dtype)  # noqa: E731
    q, k, v = r(B, H, T, d), r(B, H, T, d), r(B, H, T, d)
    rows = []
    fl = attn_flops(B, H, T, T, d, True)
    t_sdpa = t(lambda: sdpa_flash(q, k, v))
    rows.append({"what": "SDPA flash fwd", "ms": t_sdpa, "tflops": fl / t_sdpa / 1e9, "vs_sdpa": 1.0})
    t_ours = t(lambda: fa.flash_attention_fwd(q, k, v, None, None, True))
    rows.append({"what": "our flash fwd", "ms": t_ours, "tflops": fl / t_ours / 1e9, "vs_sdpa": t_sdpa / t_ours})
    # FastMKA attention = fused scan + route-mix + RoPE, then our flash
    valid = torch.ones(B, T, dtype=torch.bool, device=dev)
    sk = torch.zeros(B, H, d, device=dev)
    n0 = torch.zeros(B, dtype=torch.int64, device=dev)
    lam = torch.softmax(torch.randn(B, 1, T, 2, device=dev), -1)
    ang = torch.arange(T, device=dev)[:, None] * 10000 ** (-torch.arange(0, d, 2, device=dev) / d)
    cos = torch.cat([ang.cos(), ang.cos()], -1).expand(B, T, d).to(dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1).expand(B, T, d).to(dtype)

    def fastmka():
        kf, vf, _, _ = fmt.fastmka_mix_fwd(lam, k, v, None, None, valid, sk, sk, n0, 0.9, cos, sin)
        return fa.flash_attention_fwd(q, kf, vf, None, None, True)

    t_fast = t(fastmka)
    rows.append(
        {
            "what": "FastMKA attention (mix+RoPE+flash)",
            "ms": t_fast,
            "tflops": fl / t_fast / 1e9,
            "vs_sdpa": t_sdpa / t_fast,
        }
    )
    t_mix = t(lambda: fmt.fastmka_mix_fwd(lam, k, v, None, None, valid, sk, sk, n0, 0.9, cos, sin))
    gb = (4 * B * H * T * d * q.element_size()) / 1e9
    rows.append({"what": "fastmka mix alone", "ms": t_mix, "gbps": gb / (t_mix / 1e3), "vs_sdpa": t_sdpa / t_mix})
    t_scan = t(lambda: st.session_scan_fwd(k, v, valid, sk, sk, n0, 0.9))
    rows.append({"what": "session scan fwd", "ms": t_scan, "gbps": gb / (t_scan / 1e3), "vs_sdpa": t_sdpa / t_scan})
    # MKA: L1 + L2 + L3 (R=8 over T/64 summaries) in one pass vs one SDPA pass
    N = max(1, T // 64)
    lam3 = torch.softmax(torch.randn(B, 1, T, 3, device=dev), -1)
    idx3 = torch.randint(0, N, (B, H, T, 8), device=dev)
    found3 = torch.ones(B, H, T, 8, dtype=torch.bool, device=dev)
    mem = (torch.randn(B, H, N, d, device=dev), torch.randn(B, H, N, d, device=dev))
    margs = (q, [k, v], [v, k], lam3, q, *mem, idx3, found3, valid, d**-0.5, True)
    t_mka = t(lambda: mt.mka_attention_fwd(*margs))
    rows.append(
        {"what": "MKA attention fwd (3 levels)", "ms": t_mka, "tflops": 2 * fl / t_mka / 1e9, "vs_sdpa": t_sdpa / t_mka}
    )
    # backward: SDPA flash fwd+bwd vs ours
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    go = torch.randn_like(q)

    def sdpa_fb():
        o = sdpa_flash(qg, kg, vg)
        torch.autograd.grad(o, (qg, kg, vg), go)

    fwd = _guarded("flash fwd for the backward timing", lambda: fa.flash_attention_fwd(q, k, v, None, None, True), None)
    t_sdpa_fb = t(sdpa_fb)
    t_ours_b = t(lambda: fa.flash_attention_bwd(go, q, k, v, *fwd, None, None, True)) if fwd else math.nan
    rows.append({"what": "SDPA flash fwd+bwd", "ms": t_sdpa_fb, "tflops": 3.5 * fl / t_sdpa_fb / 1e9, "vs_sdpa": 1.0})
    rows.append(
        {
            "what": "our flash fwd+bwd",
            "ms": t_ours + t_ours_b,
            "tflops": 3.5 * fl / (t_ours + t_ours_b) / 1e9,
            "vs_sdpa": t_sdpa_fb / (t_ours + t_ours_b),
        }
    )
    # decode: one token over a T-long cache
    q1 = r(B, H, 1, d)
    t_sdpa_dec = t(lambda: sdpa_flash(q1, k, v, causal=False))
    t_dec = t(lambda: da.decode_attention_fwd(q1, k, v, None, None, True))
    k1, v1 = r(B, H, 1, d), r(B, H, 1, d)
    one = torch.ones(B, 1, dtype=torch.bool, device=dev)
    lam1 = lam[:, :, :1]

    def fast_decode():
        fmt.fastmka_mix_fwd(lam1, k1, v1, None, None, one, sk, sk, n0 + 5, 0.9, cos[:, :1], sin[:, :1])
        return da.decode_attention_fwd(q1, k, v, None, None, True)

    t_fast_dec = t(fast_decode)
    dec_bytes = 2 * B * H * T * d * q.element_size() / 1e9
    rows.append(
        {"what": "SDPA decode (1 token)", "ms": t_sdpa_dec, "gbps": dec_bytes / (t_sdpa_dec / 1e3), "vs_sdpa": 1.0}
    )
    rows.append(
        {"what": "our split-K decode", "ms": t_dec, "gbps": dec_bytes / (t_dec / 1e3), "vs_sdpa": t_sdpa_dec / t_dec}
    )
    rows.append(
        {
            "what": "FastMKA decode (mix+split-K)",
            "ms": t_fast_dec,
            "gbps": dec_bytes / (t_fast_dec / 1e3),
            "vs_sdpa": t_sdpa_dec / t_fast_dec,
        }
    )
    return rows


# ------------------------------------------------------------------------------------------------ tile sweep
#
# Each kernel is timed at the goal size for a small grid of tile configs, on the launchers' public tile
# overrides (flash forward, decode, MKA, FastMKA mix). The flash backward's launcher applies one override to
# both of its kernels, so its dK/dV and dQ tables are swept one at a time by pinning that table's entry for
# the dtype (the other kernel keeps its default; the time is the whole backward). Timing: CUDA events,
# median of --sweep-reps after --sweep-warmup calls (the first call compiles; its wall time is recorded).
# Triton's do_bench was considered: it sizes its repetitions from a time budget and flushes the L2 cache
# before each call; here every operand (>= 268 MB at the goal size) exceeds the H200's L2, so a fixed count
# of event-timed calls measures the same and keeps the sweep's cost predictable.

SWEEP_KEYS = ("flash_fwd", "flash_dkdv", "flash_dq", "decode", "fastmka_mix", "mka_fwd", "mka_bwd")
PLUMBING = importlib.import_module("mka_compile.kernels.flash_attention.plumbing")
TR = importlib.import_module("mka_compile.kernels._triton")

# Candidates per kernel on a GPU (the launcher's default is always timed first). Attention tiles are
# (BLOCK_M, BLOCK_N, num_warps, num_stages); decode (BLOCK_N, num_warps, num_stages, num_splits or None for
# the launcher's choice); FastMKA mix (BLOCK_T, BLOCK_H, num_warps).
GPU_CANDIDATES: dict[str, list[tuple]] = {
    "flash_fwd": [
        (128, 64, 8, 2),
        (128, 64, 8, 4),
        (128, 128, 8, 2),
        (128, 128, 8, 3),
        (128, 64, 4, 3),
        (128, 32, 8, 3),
        (64, 64, 4, 3),
        (64, 64, 4, 4),
        (64, 128, 4, 3),
        (64, 128, 8, 3),
        (64, 32, 4, 4),
        (128, 64, 8, 3),
    ],
    "flash_dkdv": [
        (32, 64, 4, 3),
        (32, 128, 8, 3),
        (32, 128, 4, 2),
        (64, 64, 8, 3),
        (64, 128, 8, 2),
        (16, 64, 4, 3),
        (32, 64, 4, 4),
        (64, 64, 4, 2),
        (32, 64, 8, 3),
    ],
    "flash_dq": [
        (64, 32, 4, 4),
        (64, 64, 4, 3),
        (64, 64, 8, 3),
        (128, 32, 8, 3),
        (128, 64, 8, 2),
        (32, 32, 4, 3),
        (64, 32, 8, 3),
        (128, 32, 4, 2),
        (64, 32, 4, 3),
    ],
    "decode": [
        (32, 4, 2, None),
        (128, 4, 3, None),
        (64, 4, 4, None),
        (64, 2, 3, None),
        (64, 4, 3, 8),
        (64, 4, 3, 16),
        (64, 4, 3, 32),
        (128, 4, 3, 16),
        (128, 8, 3, 16),
        (32, 2, 3, 32),
        (64, 4, 3, None),
    ],
    "fastmka_mix": [
        (16, 16, 4),
        (64, 16, 4),
        (32, 8, 4),
        (32, 8, 2),
        (32, 32, 4),
        (32, 64, 8),
        (16, 8, 2),
        (64, 32, 8),
        (32, 16, 2),
        (32, 4, 1),
        (32, 16, 4),
    ],
    "mka_fwd": [
        (64, 32, 4, 3),
        (64, 64, 4, 2),
        (64, 64, 8, 2),
        (128, 32, 8, 2),
        (128, 64, 8, 2),
        (64, 32, 8, 2),
        (32, 32, 4, 2),
        (64, 16, 4, 3),
        (64, 32, 4, 2),
    ],
    "mka_bwd": [(32, 32, 4, 2), (64, 64, 8, 2), (64, 32, 8, 1), (64, 32, 4, 2)],
}
# CPU (--smoke, Triton interpreter): one alternative each, to run the sweep's code path.
SMOKE_CANDIDATES: dict[str, list[tuple]] = {  # bigger tiles = fewer programs = faster interpreted
    "flash_fwd": [(64, 64, 1, 1)],
    "flash_dkdv": [(64, 64, 1, 1)],
    "flash_dq": [(64, 64, 1, 1)],
    "decode": [(64, 1, 1, 1)],
    "fastmka_mix": [(64, 16, 1)],
    "mka_fwd": [(32, 32, 1, 1)],
    "mka_bwd": [(32, 32, 1, 1)],
}


# Where each kernel's default lives (for adopting a winner); {key} is the table key (element size, head dim).
WHERE = {
    "flash_fwd": "FWD_CONFIGS[{key}] in kernels/flash_attention/plumbing.py",
    "flash_dkdv": "DKDV_CONFIGS[{key}] in kernels/flash_attention/plumbing.py",
    "flash_dq": "DQ_CONFIGS[{key}] in kernels/flash_attention/plumbing.py",
    "decode": "DECODE_CONFIGS[{key}] (splits: _num_splits) in kernels/decode_attention.py",
    "fastmka_mix": "fastmka_mix_fwd's BLOCK_T/BLOCK_H/num_warps defaults in kernels/fastmka_mix_triton.py",
    "mka_fwd": "_config in kernels/mka_attention_triton.py",
    "mka_bwd": "_config in kernels/mka_attention_triton.py (shared with the forward)",
}


class Tunable:
    """One kernel's sweep: ``run(cfg)`` at the goal size (timed; returns its outputs), ``check(cfg)`` its
    relative error against the reference at the check size (odd length, GQA where the kernel has it)."""

    def __init__(self, key, label, params, default, candidates, run, check, reps_scale=1):
        self.key, self.label, self.params, self.default = key, label, params, tuple(default)
        self.candidates = [self.default] + [tuple(c) for c in candidates if tuple(c) != self.default]
        self.run, self.check, self.reps_scale = run, check, reps_scale
        self.table_key: tuple[int, int] | None = None


def bench(dev: torch.device, fn: Callable[[], object], warmup: int, reps: int) -> tuple[float, float]:
    """``(median ms over reps, wall seconds of the first call)``; the first call compiles."""
    t0 = time.perf_counter()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        fn()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times), first


def max_rel_err(a, b) -> float:
    """Largest relative error over matching tensors of two (nested) outputs."""
    if isinstance(a, torch.Tensor):
        return rel_err(a, b)
    return max(max_rel_err(x, y) for x, y in zip(a, b) if x is not None)


class pinned_table:
    """``with pinned_table(DKDV_CONFIGS, q, cfg):`` the flash launcher tries only ``cfg`` for q's dtype and head
    size (CPU: the interpreter's config, shared by all flash kernels); the launch cache is set aside."""

    def __init__(self, table: dict, x: torch.Tensor, cfg: tuple) -> None:
        self.table, self.cfg, self.cpu = table, tuple(cfg), x.device.type == "cpu"
        self.key = (2 if x.element_size() == 2 else 4, max(64, fa.block_d(x.shape[-1])))

    def __enter__(self):
        self.chosen = dict(PLUMBING._CHOSEN)
        PLUMBING._CHOSEN.clear()
        if self.cpu:
            self.saved, PLUMBING.INTERPRETER_CONFIG = PLUMBING.INTERPRETER_CONFIG, self.cfg
        else:
            self.saved, self.table[self.key] = self.table[self.key], [self.cfg]
        return self

    def __exit__(self, *exc):
        if self.cpu:
            PLUMBING.INTERPRETER_CONFIG = self.saved
        else:
            self.table[self.key] = self.saved
        PLUMBING._CHOSEN.clear()
        PLUMBING._CHOSEN.update(self.chosen)
        return False


def _tiles(cfg) -> dict:
    return dict(zip(("block_m", "block_n", "num_warps", "num_stages"), cfg))


def make_tunables(dev, dtype, s, keys) -> list[Tunable]:
    """The sweep of each kernel in ``keys`` at the goal size ``s`` (B, H, T, d; causal)."""
    cpu = dev.type == "cpu"
    cands = SMOKE_CANDIDATES if cpu else GPU_CANDIDATES
    B, H, T, d = s["B"], s["H"], s["T"], s["d"]
    scale = d**-0.5
    g = torch.Generator(device="cpu").manual_seed(1)
    r = lambda *shape: torch.randn(*shape, generator=g).to(dev, dtype)  # noqa: E731
    torch.manual_seed(1)  # goal-size inputs are drawn on the device (fast); check-size ones from g
    rd = lambda *shape, dt=dtype: torch.randn(*shape, device=dev, dtype=dt)  # noqa: E731
    q, k, v, go = rd(B, H, T, d), rd(B, H, T, d), rd(B, H, T, d), rd(B, H, T, d)
    # check size: odd length, GQA (4 query heads per kv head)
    Bc, Hkv, Tc = 2, max(1, s["H"] // 4), s["T_check"]
    qc, kc, vc, goc = r(Bc, H, Tc, d), r(Bc, Hkv, Tc, d), r(Bc, Hkv, Tc, d), r(Bc, H, Tc, d)
    es, bd = (2 if q.element_size() == 2 else 4), fa.block_d(d)
    flash_default = lambda table: PLUMBING.INTERPRETER_CONFIG if cpu else table[(es, max(64, bd))][0]  # noqa: E731
    cache: dict[str, object] = {}

    def once(name, fn):
        if name not in cache:
            cache[name] = fn()
        return cache[name]

    out: list[Tunable] = []
    # flash attention forward / backward
    ref_fwd = lambda: fa.reference_flash_attention(qc, kc, vc, None, scale, True)[0]  # noqa: E731
    ref_bwd = lambda: fa.reference_flash_attention_backward(goc, None, qc, kc, vc, None, scale, True)  # noqa: E731
    out.append(
        Tunable(
            "flash_fwd",
            "flash fwd",
            ("BLOCK_M", "BLOCK_N", "warps", "stages"),
            flash_default(fa.FWD_CONFIGS),
            cands["flash_fwd"],
            lambda c: fa.flash_attention_fwd(q, k, v, None, None, True, **_tiles(c))[0],
            lambda c: rel_err(
                fa.flash_attention_fwd(qc, kc, vc, None, None, True, **_tiles(c))[0], once("fwd", ref_fwd)
            ),
        )
    )

    fwd_goal = lambda: fa.flash_attention_fwd(q, k, v, None, None, True)  # noqa: E731

    def flash_bwd(table, c, args):
        with pinned_table(table, args[1], c):
            return fa.flash_attention_bwd(*args, None, None, True)

    def flash_bwd_check(table, c):
        oc, lsec = once("fwd_lse", lambda: fa.flash_attention_fwd(qc, kc, vc, None, None, True))
        return max_rel_err(flash_bwd(table, c, (goc, qc, kc, vc, oc, lsec)), once("bwd", ref_bwd))

    for key, label, table in (
        ("flash_dkdv", "flash bwd dK/dV", fa.DKDV_CONFIGS),
        ("flash_dq", "flash bwd dQ", fa.DQ_CONFIGS),
    ):
        out.append(
            Tunable(
                key,
                label,
                ("BLOCK_M", "BLOCK_N", "warps", "stages"),
                flash_default(table),
                cands[key],
                lambda c, table=table: flash_bwd(table, c, (go, q, k, v, *once("fwd_goal", fwd_goal))),
                lambda c, table=table: flash_bwd_check(table, c),
            )
        )
    # split-K decode: one token over the T-long cache
    q1 = rd(B, H, 1, d)
    qd = qc[:, :, -3:]
    if cpu:
        dec_default = (da.INTERPRETER_BLOCK_N, 1, 1, None)
    else:
        _, bn0, w0, st0 = da.DECODE_CONFIGS[(es, max(64, bd))][0]
        dec_default = (bn0, w0, st0, None)
    dec = lambda c: dict(block_n=c[0], num_warps=c[1], num_stages=c[2], num_splits=c[3])  # noqa: E731
    out.append(
        Tunable(
            "decode",
            "split-K decode",
            ("BLOCK_N", "warps", "stages", "splits"),
            dec_default,
            cands["decode"],
            lambda c: da.decode_attention_fwd(q1, k, v, None, None, True, **dec(c))[0],
            lambda c: rel_err(
                da.decode_attention_fwd(qd, kc, vc, None, None, True, **dec(c))[0],
                once("dec", lambda: da.reference_decode_attention(qd, kc, vc, None, scale, True)[0]),
            ),
            reps_scale=4,
        )
    )
    # fused FastMKA mix (scan + route-mix + RoPE)
    valid = torch.ones(B, T, dtype=torch.bool, device=dev)
    sk = torch.zeros(B, H, d, device=dev)
    n0 = torch.zeros(B, dtype=torch.int64, device=dev)
    lam = torch.softmax(rd(B, 1, T, 2, dt=torch.float32), -1)
    cos, sin = fm.rope_tables(torch.arange(T, device=dev).expand(B, T), d, dtype=dtype)

    def mix_inputs(n):  # check size: Bc batches, odd length, padding, a carried state, RoPE
        validc = torch.ones(Bc, n, dtype=torch.bool, device=dev)
        validc[1, :5] = False
        skc = torch.randn(Bc, Hkv, d, generator=g).to(dev)
        lamc = torch.softmax(torch.randn(Bc, 1, n, 2, generator=g), -1).to(dev)
        cc, sc = fm.rope_tables(torch.arange(n, device=dev).expand(Bc, n) + 3, d, dtype=dtype)
        return (lamc, kc, vc, None, None, validc, skc, skc * 0.5, torch.tensor([0, 7], device=dev), 0.9, cc, sc)

    mix = lambda c: dict(BLOCK_T=c[0], BLOCK_H=c[1], num_warps=c[2])  # noqa: E731
    half = d // 2
    out.append(
        Tunable(
            "fastmka_mix",
            "fastmka mix",
            ("BLOCK_T", "BLOCK_H", "warps"),
            (TR.pow2(T, 16, 32), TR.pow2(half, 1, 16), 4),
            cands["fastmka_mix"],
            lambda c: fmt.fastmka_mix_fwd(lam, k, v, None, None, valid, sk, sk, n0, 0.9, cos, sin, **mix(c))[:2],
            lambda c: max_rel_err(
                fmt.fastmka_mix_fwd(*once("mix_in", lambda: mix_inputs(Tc)), **mix(c)),
                once("mix_ref", lambda: fm.reference_fastmka_mix(*cache["mix_in"])),
            ),
        )
    )
    # MKA attention: L1 + L2 + L3 (R=8 over T/64 summaries), as in the timings
    N = max(1, T // 64)
    lam3 = torch.softmax(rd(B, 1, T, 3, dt=torch.float32), -1)
    idx3 = torch.randint(0, N, (B, H, T, 8), device=dev)
    found3 = torch.ones(B, H, T, 8, dtype=torch.bool, device=dev)
    mem = (rd(B, H, N, d, dt=torch.float32), rd(B, H, N, d, dt=torch.float32))
    margs = (q, [k, v], [v, k], lam3, q, *mem, idx3, found3, valid, scale, True)
    Nc = Tc // 16 + 1
    validc = torch.ones(Bc, Tc, dtype=torch.bool, device=dev)
    validc[1, :5] = False
    cargs = (
        qc,
        [kc, kc * 0.5],
        [vc, vc * 0.5],
        torch.softmax(torch.randn(Bc, 1, Tc, 3, generator=g), -1).to(dev),
        r(Bc, H, Tc, d),
        torch.randn(Bc, Hkv, Nc, d, generator=g).to(dev),
        torch.randn(Bc, Hkv, Nc, d, generator=g).to(dev),
        torch.randint(0, Nc, (Bc, Hkv, Tc, 4), generator=g).to(dev),
        (torch.rand(Bc, Hkv, Tc, 4, generator=g) > 0.3).to(dev),
        validc,
        scale,
        True,
    )
    mka_default = mt._config(bd, T, None, None, None, None)
    out.append(
        Tunable(
            "mka_fwd",
            "MKA attention fwd",
            ("BLOCK_M", "BLOCK_N", "warps", "stages"),
            mka_default,
            cands["mka_fwd"],
            lambda c: mt.mka_attention_fwd(*margs, **_tiles(c))[0],
            lambda c: rel_err(
                mt.mka_attention_fwd(*cargs, **_tiles(c))[0], once("mka", lambda: ma.reference_mka_attention(*cargs))
            ),
        )
    )
    out.append(
        Tunable(
            "mka_bwd",
            "MKA attention bwd",
            ("BLOCK_M", "BLOCK_N", "warps", "stages"),
            mka_default,
            cands["mka_bwd"],
            lambda c: mt.mka_attention_bwd(go, *margs, **_tiles(c))[:3],
            lambda c: max_rel_err(
                mt.mka_attention_bwd(goc, *cargs, **_tiles(c))[:3],
                once("mka_bwd", lambda: ma.reference_mka_attention_backward(goc, *cargs)[:3]),
            ),
        )
    )
    for t in out:
        t.table_key = (es, max(64, bd))
    return [t for t in out if t.key in keys]


def _cuda_broken(e: Exception) -> bool:
    """An error after which the CUDA context is unusable (illegal address, launch failure...)."""
    text = str(e)
    return any(m in text for m in ("CUDA error", "Triton Error [CUDA]", "illegal memory access", "launch failure"))


def run_sweep(dev, dtype, tunables, budget_s, warmup, reps, tol, on_update=None) -> dict:
    """Time every candidate of each tunable within ``budget_s`` seconds (each kernel gets an equal share of
    what is left when it starts, at least its default and one alternative); check the fastest against the
    reference (check size) and against the default's output (goal size); the first that passes wins."""
    t_start = time.time()
    kernels: list[dict] = []
    report = {"budget_s": budget_s, "warmup": warmup, "reps": reps, "kernels": kernels, "stopped": None}
    report["device_type"] = dev.type
    broken = False
    for i, tu in enumerate(tunables):
        entry = {
            "key": tu.key,
            "kernel": tu.label,
            "params": list(tu.params),
            "default": list(tu.default),
            "where": WHERE[tu.key].format(key=tu.table_key),
            "results": [],
            "best": None,
            "stopped": None,
        }
        kernels.append(entry)
        left = budget_s - (time.time() - t_start)
        if broken or left <= 0:
            entry["stopped"] = "not run: " + ("the CUDA context broke earlier" if broken else "sweep budget spent")
            continue
        share = left / (len(tunables) - i)
        k_start = time.time()
        n = len(tu.candidates)
        for j, cfg in enumerate(tu.candidates):
            if time.time() - t_start > budget_s:
                entry["stopped"] = f"sweep budget ({budget_s:.0f} s) spent after {j} of {n} configs"
                break
            if j >= 2 and time.time() - k_start > share:
                entry["stopped"] = f"this kernel's share ({share:.0f} s) spent after {j} of {n} configs"
                break
            rec: dict = {"config": list(cfg), "ms": None}
            try:
                rec["ms"], rec["first_call_s"] = bench(
                    dev, functools.partial(tu.run, cfg), warmup, reps * tu.reps_scale
                )
                rec["status"] = "ok"
            except Exception as e:  # noqa: BLE001  (recorded: out of shared memory, compile failure, ...)
                rec["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                broken = dev.type == "cuda" and _cuda_broken(e)
            entry["results"].append(rec)
            ms = f"{rec['ms']:9.3f} ms  (first call {rec['first_call_s']:.1f} s)" if rec["ms"] is not None else ""
            print(f"sweep {tu.label:18s} {_cfg_str(cfg):18s} {ms or rec['status'][:100]}", flush=True)
            if broken:
                entry["stopped"] = report["stopped"] = "CUDA error: the context is unusable, sweep stopped"
                break
        if not broken:
            _pick_winner(tu, entry, tol)
        entry["seconds"] = time.time() - k_start
        if on_update:
            on_update(report)
    report["seconds"] = time.time() - t_start
    return report


def _pick_winner(tu: Tunable, entry: dict, tol: float) -> None:
    timed = sorted((r for r in entry["results"] if r["ms"] is not None), key=lambda r: r["ms"])
    default = next((r for r in entry["results"] if tuple(r["config"]) == tu.default), None)
    default_out = None
    for rec in timed[:3]:
        cfg = tuple(rec["config"])
        try:
            rec["check_rel_err"] = tu.check(cfg)
            if cfg != tu.default and default is not None and default["ms"] is not None:
                if default_out is None:
                    default_out = tu.run(tu.default)
                rec["rel_err_vs_default"] = max_rel_err(tu.run(cfg), default_out)
        except Exception as e:  # noqa: BLE001
            rec["status"] = f"check failed: {type(e).__name__}: {str(e)[:200]}"
            continue
        ok = rec["check_rel_err"] <= tol and rec.get("rel_err_vs_default", 0.0) <= tol
        if ok:
            entry["best"] = rec
            break
        rec["status"] = "WRONG RESULT (rel err above tolerance)"
    if default is not None and default["ms"] is not None and entry["best"] is not None:
        entry["default_ms"] = default["ms"]
        entry["speedup"] = default["ms"] / entry["best"]["ms"]
    entry["wrong"] = [r["config"] for r in entry["results"] if r.get("status", "").startswith("WRONG")]


def _cfg_str(cfg) -> str:
    return ",".join("auto" if c is None else str(c) for c in cfg)


def sweep_table(sw: dict, header: str) -> str:
    lines = [
        header,
        f"{'kernel':18s} {'params':32s} {'default':>16s} {'ms':>9s}  {'best':>16s} {'ms':>9s}  speedup  check",
    ]
    notes = []
    for e in sw["kernels"]:
        default = next((r for r in e["results"] if r["config"] == e["default"]), None)
        d_ms = f"{default['ms']:.3f}" if default and default["ms"] is not None else "-"
        b = e["best"]
        b_cfg, b_ms = (_cfg_str(b["config"]), f"{b['ms']:.3f}") if b else ("-", "-")
        sp = f"{e['speedup']:.2f}x" if "speedup" in e else "-"
        chk = f"ok {b['check_rel_err']:.1e}" if b else ("NO WINNER" if e["results"] else "-")
        lines.append(
            f"{e['kernel']:18s} {','.join(e['params']):32s} {_cfg_str(e['default']):>16s} {d_ms:>9s}  "
            f"{b_cfg:>16s} {b_ms:>9s}  {sp:>7s}  {chk}"
        )
        failed = [r for r in e["results"] if r["ms"] is None]
        if failed:
            reasons = sorted({r["status"].split(":")[1].strip() if ":" in r["status"] else r["status"] for r in failed})
            notes.append(f"{e['kernel']}: {len(failed)} of {len(e['results'])} configs failed ({', '.join(reasons)})")
        if e.get("wrong"):
            notes.append(f"{e['kernel']}: WRONG results at {e['wrong']}")
        if e["stopped"]:
            notes.append(f"{e['kernel']}: {e['stopped']}")
        if e.get("speedup", 1.0) >= 1.03 and sw.get("device_type") == "cuda":  # CPU: interpreter tiles
            notes.append(f"{e['kernel']}: to adopt {_cfg_str(b['config'])}, put it first in {e['where']}")
    used = sw.get("seconds")
    lines.append(f"sweep time {used:.0f} s of a {sw['budget_s']:.0f} s budget" if used is not None else "")
    return "\n".join(lines + notes)


# ----------------------------------------------------------------------------------------------------- main


def print_tables(device_name, dtype, sizes, chk, rows) -> list[tuple[str, float, bool]]:
    print(f"\n{device_name}, {dtype}, B={sizes['B']} H={sizes['H']} T={sizes['T']} d={sizes['d']}, causal")
    print(f"{'check':40s} {'rel err':>10s}  ok")
    for c in chk:
        print(f"{c['kernel']:40s} {c['rel_err']:10.2e}  {'yes' if c['ok'] else 'NO'}")
    print(f"\n{'timing':40s} {'ms':>10s} {'TFLOP/s':>9s} {'GB/s':>9s} {'SDPA/ours':>10s}")
    for row in rows:
        tf_ = f"{row['tflops']:.1f}" if "tflops" in row else "-"
        gb_ = f"{row['gbps']:.0f}" if "gbps" in row else "-"
        print(f"{row['what']:40s} {row['ms']:10.3f} {tf_:>9s} {gb_:>9s} {row['vs_sdpa']:10.2f}")
    by = {r["what"]: r for r in rows}
    fast, mka, dec = (by.get(w, {}).get("vs_sdpa", math.nan) for w in (ALL_FAST, ALL_MKA, ALL_DEC))
    tflops = by.get("our flash fwd", {}).get("tflops", math.nan)
    goals = [
        ("our flash fwd >= 450 TFLOP/s", tflops, tflops >= 450),
        ("FastMKA attention: SDPA/ours >= 0.90", fast, fast >= 0.90),
        ("MKA: ours/SDPA <= 1.6", 1 / mka, 1 / mka <= 1.6),
        ("FastMKA decode: ours/SDPA <= 1.05", 1 / dec, 1 / dec <= 1.05),
    ]
    print(f"\n{'goal (issue 5; meaningful at full size on a GPU)':52s} {'value':>9s}  met")
    for g, v, m in goals:
        print(f"{g:52s} {v:9.2f}  {'yes' if m else 'no'}")
    sys.stdout.flush()
    return goals


ALL_FAST, ALL_MKA, ALL_DEC = (
    "FastMKA attention (mix+RoPE+flash)",
    "MKA attention fwd (3 levels)",
    "FastMKA decode (mix+split-K)",
)


def _guarded(what: str, fn: Callable[[], object], failed: object) -> object:
    """``fn()``, or ``failed`` after printing the error (so the sweep and the tables still run)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        print(f"{what} FAILED: {type(e).__name__}: {str(e)[:1000]}", flush=True)
        return failed


def _keys(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in keys if k not in SWEEP_KEYS]
    if bad or not keys:
        raise argparse.ArgumentTypeError(f"unknown kernel {bad or text!r}; choose from {', '.join(SWEEP_KEYS)}")
    return keys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU: Triton interpreter)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", default=os.environ.get("OUT"))
    p.add_argument("--sweep", action="store_true", help="also sweep tile configs per kernel at the goal size")
    p.add_argument(
        "--sweep-only",
        type=_keys,
        default=None,
        metavar="KERNELS",
        help=f"only sweep these kernels (comma-separated: {', '.join(SWEEP_KEYS)}); no checks or timings",
    )
    p.add_argument("--sweep-budget", type=float, default=200.0, help="seconds for the whole sweep (default 200)")
    p.add_argument("--sweep-reps", type=int, default=5, help="timed calls per config (median; decode: 4x)")
    p.add_argument("--sweep-warmup", type=int, default=2, help="calls before timing, the first compiles")
    args = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and not args.smoke:
        print("no CUDA device: run with --smoke to exercise the script on the CPU interpreter", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if dev.type == "cuda" else torch.float32
    sizes = (
        {"B": 1, "H": 2, "T": 48, "d": 32, "T_check": 33}
        if args.smoke
        else {"B": 4, "H": 32, "T": 8192, "d": 128, "T_check": 1000}
    )
    reps = args.reps or (2 if args.smoke else 30)
    sweep_reps, sweep_warmup = (1, 1) if args.smoke else (args.sweep_reps, args.sweep_warmup)
    device_name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (Triton interpreter)"
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "device": device_name,
        "dtype": str(dtype),
        "sizes": sizes,
        "torch": torch.__version__,
        "triton": getattr(importlib.import_module("triton"), "__version__", "?"),
    }

    def save() -> None:
        if out_dir:
            (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2))

    t0 = time.time()
    chk = rows = None
    if args.sweep_only is None:
        chk = _guarded(
            "checks", lambda: checks(dev, dtype, sizes), [{"kernel": "checks", "rel_err": math.nan, "ok": False}]
        )
        report["checks"] = chk
        save()
        rows = _guarded(
            "timings",
            lambda: timings(dev, dtype, sizes, reps),
            [{"what": "timings", "ms": math.nan, "vs_sdpa": math.nan}],
        )
        report["timings"] = rows
        report["seconds"] = time.time() - t0
        goals = print_tables(device_name, dtype, sizes, chk, rows)  # printed again last when sweeping
        report["goals"] = [{"goal": g, "value": v, "met": bool(m)} for g, v, m in goals]
        save()
    sweep_ok = True
    if args.sweep or args.sweep_only:
        keys = args.sweep_only or list(SWEEP_KEYS)
        tol = 2e-2 if dtype != torch.float32 else 1e-4
        header = (
            f"tile sweep: {device_name}, {dtype}, B={sizes['B']} H={sizes['H']} T={sizes['T']} d={sizes['d']}, "
            f"causal; median of {sweep_reps} after {sweep_warmup} calls (decode {4 * sweep_reps})"
        )
        print(f"\n{header}", flush=True)

        def on_update(sw):  # after each kernel: what a timeout would otherwise lose
            report["sweep"] = sw
            save()
            if out_dir:
                (out_dir / "sweep.txt").write_text(sweep_table(sw, header + " (partial)") + "\n")

        sw = run_sweep(
            dev,
            dtype,
            make_tunables(dev, dtype, sizes, keys),
            args.sweep_budget,
            sweep_warmup,
            sweep_reps,
            tol,
            on_update,
        )
        report["sweep"] = sw
        report["seconds"] = time.time() - t0
        save()
        text = sweep_table(sw, header)
        if out_dir:
            (out_dir / "sweep.txt").write_text(text + "\n")
        print("\n" + text, flush=True)
        sweep_ok = sw["stopped"] is None and all(e["best"] is not None or not e["results"] for e in sw["kernels"])
        sweep_ok = sweep_ok and not any(e.get("wrong") for e in sw["kernels"])
        if rows is not None:
            print_tables(device_name, dtype, sizes, chk, rows)
    checks_ok = chk is None or (all(c["ok"] for c in chk) and all(math.isfinite(r["ms"]) for r in rows))
    return 0 if checks_ok and sweep_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
