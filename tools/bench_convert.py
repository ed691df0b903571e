"""Overhead of one-line conversion on the CPU (a benchmark, not a test).

    python tools/bench_convert.py               # tiny Llama: d=256, 4 layers, 8 heads, 4 kv heads, T=1024, batch 1

Times, side by side in one run (interleaved, median of --repeats): the original model and the same model
converted to FastMKA and to MKA (all three memory levels, random router values), forward and forward+backward.
Goals (issue 4): FastMKA forward / original <= 1.10, forward+backward <= 1.15, MKA forward <= 1.6.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import transformers as tf
from rich.console import Console
from rich.table import Table

import mka_compile


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=11)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
    )
    base = tf.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    conv = mka_compile.convert(copy.deepcopy(base))
    full = mka_compile.convert(copy.deepcopy(base), mode="mka")
    with torch.no_grad():
        for m in (conv, full):
            for name, prm in m.named_parameters():
                if ".mka." in name:
                    prm.fill_(1.0) if name.endswith("gate") else prm.normal_(0, 0.3)
    ids = torch.randint(0, 1000, (1, args.tokens))

    def fwd(m):
        with torch.no_grad():
            m(ids, use_cache=False)

    def fwd_bwd(m):
        m(ids, labels=ids, use_cache=False).loss.backward()

    cands = {
        "original fwd": lambda: fwd(base),
        "FastMKA fwd": lambda: fwd(conv),
        "MKA fwd": lambda: fwd(full),
        "original fwd+bwd": lambda: fwd_bwd(base),
        "FastMKA fwd+bwd": lambda: fwd_bwd(conv),
    }
    for f in cands.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in cands}
    for r in range(args.repeats):
        names = list(cands)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            cands[name]()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    t = Table(
        title=f"convert overhead: tiny Llama d=256, 4 layers, 8/4 heads, T={args.tokens}, batch 1 "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads)"
    )
    for col in ("measurement", "median ms", "ratio to original", "goal"):
        t.add_column(col)
    t.add_row("original fwd", f"{med['original fwd']:.1f}", "1.00", "")
    t.add_row("FastMKA fwd", f"{med['FastMKA fwd']:.1f}", f"{med['FastMKA fwd'] / med['original fwd']:.2f}", "<= 1.10")
    t.add_row("MKA fwd", f"{med['MKA fwd']:.1f}", f"{med['MKA fwd'] / med['original fwd']:.2f}", "<= 1.6")
    t.add_row("original fwd+bwd", f"{med['original fwd+bwd']:.1f}", "1.00", "")
    t.add_row(
        "FastMKA fwd+bwd",
        f"{med['FastMKA fwd+bwd']:.1f}",
        f"{med['FastMKA fwd+bwd'] / med['original fwd+bwd']:.2f}",
        "<= 1.15",
    )
    Console().print(t)


if __name__ == "__main__":
    main()
