"""The tile sweep of ``tools/gpu/check.py --sweep``: time a small grid of tile configurations per Triton kernel at
the goal size, check each winner against the reference, and say where a winner belongs in the kernel's config table.
Imported by ``tools/gpu/check.py`` (see its docstring for the command line)."""

from __future__ import annotations

import functools
import importlib
import statistics
import time
from collections.abc import Callable

import torch

import mka_compile.kernels  # noqa: F401  (registers the ops and their CUDA kernels)
from tools.gpu.sweep_candidates import WHERE

fa = importlib.import_module("mka_compile.kernels.flash_attention")
ma = importlib.import_module("mka_compile.kernels.mka_attention.reference")
mt = importlib.import_module("mka_compile.kernels.mka_attention.triton_launch")
ss = importlib.import_module("mka_compile.kernels.session_scan.reference")
st = importlib.import_module("mka_compile.kernels.session_scan.triton_kernels")
lt = importlib.import_module("mka_compile.kernels.longterm.reference")
ltt = importlib.import_module("mka_compile.kernels.longterm.triton_kernels")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


SWEEP_KEYS = ("flash_fwd", "flash_dkdv", "flash_dq", "mka_fwd", "mka_bwd")
PLUMBING = importlib.import_module("mka_compile.kernels.flash_attention.plumbing")
TR = importlib.import_module("mka_compile.kernels._triton")


class Tunable:
    """One kernel's sweep: ``run(cfg)`` at the goal size (timed; returns its outputs), ``check(cfg)`` its
    relative error against the reference at the check size (odd length, GQA where the kernel has it)."""

    def __init__(self, key, label, params, default, candidates, run, check):
        self.key, self.label, self.params, self.default = key, label, params, tuple(default)
        self.candidates = [self.default] + [tuple(c) for c in candidates if tuple(c) != self.default]
        self.run, self.check = run, check
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
                rec["ms"], rec["first_call_s"] = bench(dev, functools.partial(tu.run, cfg), warmup, reps)
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
