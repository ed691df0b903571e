"""Time ``mka_compile.inspect`` on a deep tiny Llama (a benchmark, not a test).

    python tools/bench/detection.py             # 32 layers, eager and sdpa, export and dynamo capture
    python tools/bench/detection.py --layers 8 --repeats 1

Prints a table: layers, attention implementation, capture, sites found, median seconds (goal: <= 5 s for
32 layers on a 2-core CPU with the default export capture).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers as tf
from rich.console import Console
from rich.table import Table

import mka_compile


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--captures", nargs="+", default=["export", "dynamo"])
    args = p.parse_args(argv)
    table = Table(title=f"mka_compile.inspect on a {args.layers}-layer tiny Llama (torch {torch.__version__})")
    for col in ("layers", "attention", "capture", "sites", "median s", "min s"):
        table.add_column(col)
    for attn in ("eager", "sdpa"):
        cfg = tf.LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=args.layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        model = tf.LlamaForCausalLM._from_config(cfg, attn_implementation=attn).eval()
        for cap in args.captures:
            times, n = [], 0
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                n = len(mka_compile.inspect(model, capture=cap).sites)
                times.append(time.perf_counter() - t0)
            table.add_row(str(args.layers), attn, cap, str(n), f"{statistics.median(times):.2f}", f"{min(times):.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
