"""Overhead of one-line conversion on the CPU (a benchmark, not a test).

    python tools/bench/conversion.py            # tiny Llama: d=256, 4 layers, 8 heads, 4 kv heads, T=1024, batch 1

Times, side by side in one run (interleaved, median of --repeats): the original model and the same model
converted to FastMKA and to MKA (all three memory levels, random router values), forward and forward+backward
(``mka_compile.bench.model_ratios``; also ``mka-compile bench``).
Goals (issue 4): FastMKA forward / original <= 1.10, forward+backward <= 1.15, MKA forward <= 1.6.
"""

from __future__ import annotations

import argparse

import torch
import transformers as tf
from rich.console import Console
from rich.table import Table

from mka_compile.bench import model_ratios

GOALS = {"fastmka fwd": 1.10, "fastmka fwd+bwd": 1.15, "mka fwd": 1.6}


def bench_llama() -> tf.LlamaForCausalLM:
    """The CPU benchmarks' model: a tiny Llama (d=256, 4 layers, 8 heads, 4 kv heads, SDPA), random weights, eval."""
    cfg = tf.LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
    )
    return tf.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=11)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    base = bench_llama()
    ids = torch.randint(0, base.config.vocab_size, (1, args.tokens))
    rows = model_ratios(base, dict(input_ids=ids, labels=ids, use_cache=False), repeats=args.repeats)
    t = Table(
        title=f"convert overhead: tiny Llama d=256, 4 layers, 8/4 heads, T={args.tokens}, batch 1 "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads)"
    )
    for col in ("measurement", "median ms", "ratio to original", "goal", "met"):
        t.add_column(col)
    for r in rows:
        goal = GOALS.get(r["what"])
        met = "" if goal is None else ("yes" if r["ratio"] <= goal else "no")
        t.add_row(r["what"], f"{r['ms']:.1f}", f"{r['ratio']:.2f}", "" if goal is None else f"<= {goal}", met)
    Console().print(t)
    return rows


if __name__ == "__main__":
    main()
