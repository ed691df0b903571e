"""Benchmark the ``mka::`` ops and MKA layers against simple baselines on the CPU (inference only).

What it measures, side by side in one run, under ``torch.inference_mode()``:

1. L2 session scan: ``mka_compile.kernels.session_scan`` (vectorised chunked EMA scan) versus the
   straightforward per-token Python loop (``s_t = beta * s_{t-1} + (1 - beta) * k_t`` with ``s_0 = k_0``,
   float32 state for k and v, outputs stacked) at B=4, Hkv=8, T=4096, d=64, float32. Reports the median
   and minimum time of each, the speed-up (loop / scan) and the max abs difference of all four outputs.
2. Layer forwards at B=1, T=2048, hidden 512, 8 heads, 8 kv heads, default ``MKAConfig``:
   ``MKAAttention`` / ``FastMKAAttention`` (same weights), and, for context, ``FastMKAAttention`` / a plain
   attention layer of the same size (q/k/v projections + causal ``scaled_dot_product_attention`` + o_proj,
   no RoPE, no memory levels) sharing the projection weights.

Timing: ``time.perf_counter`` around each call, warm-up calls first, and the candidates of one comparison
are interleaved within every repeat (their order rotates from repeat to repeat) so machine noise hits
all of them alike. Results are printed as a ``rich`` table with the torch version and thread count.

Run from the repository root::

    python tools/bench/cpu_ops.py                 # default sizes (15-25 s on an idle 2-core CPU)
    python tools/bench/cpu_ops.py --quick         # small sizes, a few seconds
    python tools/bench/cpu_ops.py --repeats 31 --threads 2
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from mka_compile import FastMKAAttention, MKAAttention, MKAConfig
from mka_compile.bench import SDPAAttention
from mka_compile.kernels import session_scan

try:  # Unix only: minor page faults per call (fresh large allocations are mapped and zeroed by the kernel)
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

SCAN_TOL = 1e-4  # fp32 chunked scan vs sequential recurrence; observed differences are ~1e-6


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one benchmark run."""

    scan_batch: int
    scan_heads: int
    scan_len: int
    scan_dim: int
    attn_batch: int
    attn_len: int
    hidden: int
    heads: int
    kv_heads: int


DEFAULT_SIZES = Sizes(4, 8, 4096, 64, 1, 2048, 512, 8, 8)
QUICK_SIZES = Sizes(2, 4, 512, 64, 1, 256, 256, 4, 4)


@dataclass(frozen=True)
class Timing:
    """Per-repeat wall times (seconds) and minor page faults of one candidate."""

    times: list[float]
    faults: list[int]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1e3

    @property
    def min_ms(self) -> float:
        return min(self.times) * 1e3

    @property
    def faults_per_call(self) -> str:
        return f"{statistics.median(self.faults):,.0f}" if resource is not None else "n/a"


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def bench_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, Timing]:
    """Time every function once per repeat, rotating their order each repeat; warm each up first."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    faults: dict[str, list[int]] = {name: [] for name in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                f0 = _minor_faults()
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
                faults[name].append(_minor_faults() - f0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: Timing(times[name], faults[name]) for name in names}


# -- 1. L2 session scan ---------------------------------------------------------------------------------


def loop_session_scan(
    k: torch.Tensor, v: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token reference: ``s_0 = k_0``, ``s_t = beta * s_{t-1} + (1 - beta) * k_t`` in float32."""
    sk = k[:, :, 0].float()
    sv = v[:, :, 0].float()
    out_k, out_v = [sk], [sv]
    for t in range(1, k.shape[2]):
        sk = beta * sk + (1.0 - beta) * k[:, :, t].float()
        sv = beta * sv + (1.0 - beta) * v[:, :, t].float()
        out_k.append(sk)
        out_v.append(sv)
    return torch.stack(out_k, 2).to(k.dtype), torch.stack(out_v, 2).to(v.dtype), sk, sv


@dataclass(frozen=True)
class ScanResult:
    timings: dict[str, Timing]  # "scan", "loop", "floor"
    max_diff: float  # max abs difference over s_k, s_v, state_k, state_v


@dataclass(frozen=True)
class LayerResult:
    timings: dict[str, Timing]  # "mka", "fast", "sdpa"
    finite: bool  # every layer output is finite
    config: MKAConfig


def bench_scan(sizes: Sizes, repeats: int, warmup: int, seed: int, beta: float) -> ScanResult:
    gen = torch.Generator().manual_seed(seed)
    shape = (sizes.scan_batch, sizes.scan_heads, sizes.scan_len, sizes.scan_dim)
    k = torch.randn(shape, generator=gen, dtype=torch.float32)
    v = torch.randn(shape, generator=gen, dtype=torch.float32)
    got = session_scan(k, v, beta)
    want = loop_session_scan(k, v, beta)
    max_diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, want, strict=True))
    del got, want
    timings = bench_interleaved(
        {
            "scan": lambda: session_scan(k, v, beta),
            "loop": lambda: loop_session_scan(k, v, beta),
            # the least any scan must do: write two fresh outputs of the input's size
            "floor": lambda: (k.clone(), v.clone()),
        },
        repeats,
        warmup,
    )
    return ScanResult(timings, max_diff)


# -- 2. attention layers --------------------------------------------------------------------------------


def bench_layers(sizes: Sizes, repeats: int, warmup: int, seed: int) -> LayerResult:
    config = MKAConfig()
    torch.manual_seed(seed)
    mka = MKAAttention(sizes.hidden, sizes.heads, sizes.kv_heads, config=config).eval()
    fast = FastMKAAttention(sizes.hidden, sizes.heads, sizes.kv_heads, config=config).eval()
    fast.load_state_dict(mka.state_dict())  # identical parameters (same module layout)
    sdpa = SDPAAttention(sizes.hidden, sizes.heads, sizes.kv_heads).eval()
    sdpa.load_state_dict({n: p for n, p in mka.state_dict().items() if n.split(".")[0].endswith("_proj")})
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(sizes.attn_batch, sizes.attn_len, sizes.hidden, generator=gen)
    outs = {"mka": mka(x), "fast": fast(x), "sdpa": sdpa(x)}
    finite = all(bool(torch.isfinite(o).all()) for o in outs.values())
    del outs
    timings = bench_interleaved(
        {"mka": lambda: mka(x), "fast": lambda: fast(x), "sdpa": lambda: sdpa(x)}, repeats, warmup
    )
    return LayerResult(timings, finite, config)


# -- report ---------------------------------------------------------------------------------------------


def ratio(num: Timing, den: Timing) -> str:
    return f"{num.median_ms / den.median_ms:.2f}x"


def load_average() -> str:
    """1-minute load average (other processes on the machine skew multi-threaded timings badly)."""
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def render(
    sizes: Sizes, scan: ScanResult, layers: LayerResult, repeats: int, warmup: int, wall_s: float, load: str
) -> Table:
    st, lt, s = scan.timings, layers.timings, sizes
    table = Table(
        title=(
            f"mka-compile CPU benchmark - torch {torch.__version__}, {torch.get_num_threads()} threads "
            f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)"
        ),
        caption=(
            f"median / min over {repeats} interleaved repeats after {warmup} warm-up(s), inference_mode; "
            f"faults = median minor page faults per call;\nload average (1 min) at start {load}, at end "
            f"{load_average()}; total wall time {wall_s:.1f} s"
        ),
    )
    for col in ("Measurement", "Config"):
        table.add_column(col)
    for col in ("Median ms", "Min ms", "Faults/call", "Ratio / check"):
        table.add_column(col, justify="right")

    def timed(name: str, config: str, t: Timing) -> None:
        table.add_row(name, config, f"{t.median_ms:.2f}", f"{t.min_ms:.2f}", t.faults_per_call, "")

    def derived(name: str, value: str, config: str = "") -> None:
        table.add_row(name, config, "", "", "", value)

    scan_cfg = f"B={s.scan_batch} Hkv={s.scan_heads} T={s.scan_len} d={s.scan_dim} fp32"
    timed("L2 session_scan (mka::session_scan)", scan_cfg, st["scan"])
    timed("L2 per-token Python loop", scan_cfg, st["loop"])
    timed("memory floor: k.clone(), v.clone()", scan_cfg, st["floor"])
    derived("speed-up: loop / session_scan", ratio(st["loop"], st["scan"]))
    derived("bound on any speed-up: loop / floor", ratio(st["loop"], st["floor"]))
    verdict = "PASS" if scan.max_diff <= SCAN_TOL else "FAIL"
    derived("max |scan - loop| (s_k, s_v, states)", f"{scan.max_diff:.2e} {verdict}", f"tol {SCAN_TOL:g}")
    table.add_section()

    attn_cfg = f"B={s.attn_batch} T={s.attn_len} D={s.hidden} H={s.heads} Hkv={s.kv_heads} fp32"
    mka_cfg = f"{attn_cfg}, {'+'.join(layers.config.levels)}"
    timed("MKAAttention fwd", mka_cfg, lt["mka"])
    timed("FastMKAAttention fwd", mka_cfg, lt["fast"])
    timed("SDPA attention fwd", f"{attn_cfg}, causal SDPA, no RoPE", lt["sdpa"])
    derived("MKA / FastMKA", ratio(lt["mka"], lt["fast"]))
    derived("FastMKA / SDPA", ratio(lt["fast"], lt["sdpa"]))
    derived("outputs finite", "PASS" if layers.finite else "FAIL")
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per candidate (default 21, quick 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up calls per candidate (default 2)")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats: a smoke run of a few seconds")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs and weights")
    p.add_argument("--beta", type=float, default=MKAConfig().ema_beta, help="EMA decay of the scan benchmark")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 21
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES
    console = Console()
    if not console.is_terminal:  # piped / captured output: do not squeeze the table into 80 columns
        console.width = max(console.width, 140)
    load = load_average()
    start = time.perf_counter()
    with torch.inference_mode():
        with console.status("L2 session scan vs per-token loop ..."):
            scan = bench_scan(sizes, args.repeats, args.warmup, args.seed, args.beta)
        with console.status("MKA / FastMKA / SDPA layer forwards ..."):
            layers = bench_layers(sizes, args.repeats, args.warmup, args.seed)
    wall_s = time.perf_counter() - start
    console.print(render(sizes, scan, layers, args.repeats, args.warmup, wall_s, load))


if __name__ == "__main__":
    main()
