"""Bounded memory against full attention on the CPU, in one run: prefill (in blocks through the cache), decode
ms/token (median of a few steps) and ``memory_report`` at a few context lengths, for a random-weight Llama.

    python tools/bench/bounded_cpu.py                      # 1K, 4K, 16K tokens, 1 thread
    python tools/bench/bounded_cpu.py --contexts 1024 4096 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

import mka_compile
from mka_compile import MKAConfig
from mka_compile.hf.compat import cache_kwargs, returned_cache


def run(model, n: int, steps: int, block: int) -> tuple[float, float, dict]:
    ids = torch.randint(0, 256, (1, n + steps))
    cache = None
    with torch.no_grad():
        t0 = time.perf_counter()
        for lo in range(0, n, block):
            out = model(ids[:, lo : min(n, lo + block)], **cache_kwargs(model, cache), use_cache=True)
            cache = returned_cache(out)
        prefill = time.perf_counter() - t0
        times = []
        for i in range(steps):
            t = time.perf_counter()
            model(ids[:, n + i : n + i + 1], **cache_kwargs(model, cache), use_cache=True)
            times.append(time.perf_counter() - t)
    times.sort()
    return prefill, 1000 * times[len(times) // 2], mka_compile.memory_report(cache)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--block", type=int, default=1024)
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=1024,
    )  # fmt: skip
    full = transformers.LlamaForCausalLM(cfg).eval()
    bounded = transformers.LlamaForCausalLM(cfg).eval()
    bounded.load_state_dict(full.state_dict())
    mka_compile.convert(bounded, config=MKAConfig(window=256, sink_tokens=4, chunk_size=64, recall_chunks=4, top_r=4))
    print("model: Llama 4 layers, hidden 256, 8 heads / 4 kv heads; bounded W=256 S=4 C=64 R=4; trained length 1024")
    for n in args.contexts:
        for name, model in (("full", full), ("bounded", bounded)):
            pre, dec, rep = run(model, n, args.steps, args.block)
            print(
                f"{name:8s} n={n:6d} prefill {pre:7.2f} s  decode {dec:7.2f} ms/token  resident "
                f"{rep['resident_bytes'] / 1e6:7.2f} MB  offloaded {rep['offloaded_bytes'] / 1e6:7.2f} MB"
            )


if __name__ == "__main__":
    main()
