"""The timing half of ``tools/gpu_check.py``: our Triton kernels against ``scaled_dot_product_attention`` (its flash
backend), side by side at the goal size, CUDA-event medians (perf_counter on CPU)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from gpu_sweep import bench, da, fa, fmt, mt, st  # tools/ (on the path when run)


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


def attn_flops(B, H, Tq, Tk, d, causal) -> float:
    frac = 0.5 if causal and Tq == Tk else 1.0
    return 4.0 * B * H * Tq * Tk * d * frac


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


def _guarded(what: str, fn: Callable[[], object], failed: object) -> object:
    """``fn()``, or ``failed`` after printing the error (so the sweep and the tables still run)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        print(f"{what} FAILED: {type(e).__name__}: {str(e)[:1000]}", flush=True)
        return failed
