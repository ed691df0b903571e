"""Decode cost of a converted model on the CPU (a benchmark, not a test): what ``generate()`` users run.

    python tools/bench/decode.py      # tiny Llama: d=256, 4 layers, 8 heads, 4 kv heads; 256-token prompt, 1 thread

Times, side by side in one run (the models interleaved, median of --repeats): the original model and copies converted
to FastMKA and to MKA mode (all three levels, random router values, so the memory is live): greedy decode with the
cache (ms per token, the prompt's prefill not counted) and beam search through ``generate`` (ms per new token).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import mka_compile
from mka_compile.bench import randomize_mka
from mka_compile.hf.compat import cache_kwargs, returned_cache

if not __package__:  # run as a file: the checkout's `tools` package
    sys.path.append(str(Path(__file__).resolve().parents[2]))

from tools.bench.conversion import bench_llama  # noqa: E402


def greedy_ms(model, ids: torch.Tensor, steps: int) -> float:
    """ms per decode step with the cache, after a prefill of ``ids``."""
    out = model(ids, use_cache=True)
    cache, tok = returned_cache(out), out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(tok, use_cache=True, **cache_kwargs(model, cache))
        cache, tok = returned_cache(out), out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) / steps * 1e3


def beam_ms(model, ids: torch.Tensor, steps: int, beams: int) -> float:
    """ms per new token of ``generate`` with beam search (the prefill included, as users see it)."""
    t0 = time.perf_counter()
    model.generate(ids, num_beams=beams, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
    return (time.perf_counter() - t0) / steps * 1e3


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> list[dict]:
    original = bench_llama()
    models = {"original": original}
    for mode in ("fastmka", "mka"):
        models[mode] = mka_compile.convert(copy.deepcopy(original), mode=mode)
        randomize_mka(models[mode])
    ids = torch.randint(0, original.config.vocab_size, (1, args.prompt))
    times: dict[tuple[str, str], list[float]] = {}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, model in models.items():
                times.setdefault((name, "greedy"), []).append(greedy_ms(model, ids, args.steps))
                times.setdefault((name, "beams"), []).append(beam_ms(model, ids, args.steps, args.beams))
    rows = []
    for (name, what), ts in times.items():
        med = statistics.median(ts)
        rows.append(dict(model=name, what=what, ms=med, ratio=med / statistics.median(times[("original", what)])))
    table = Table(title=f"decode: prompt {args.prompt}, {args.steps} new tokens, {args.beams} beams, 1 thread")
    for col in ("model", "decode", "median ms/token", "ratio to original"):
        table.add_column(col)
    for r in sorted(rows, key=lambda r: (r["what"], r["model"] != "original", r["model"])):
        table.add_row(r["model"], r["what"], f"{r['ms']:.2f}", f"{r['ratio']:.2f}")
    Console().print(table)
    return rows


if __name__ == "__main__":
    main()
