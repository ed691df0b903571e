"""The exported decode step in ONNX Runtime: bounded memory's fixed-size step against the original model's step (whose
past K/V grow), ms/token at a few context lengths, and the bounded step at two store sizes (``max_len``).

    python tools/bench/onnx_bounded.py                 # 1 thread; ~2-4 min on a CPU

Model: a random-weight Llama (4 layers, hidden 256, 8 heads / 4 kv heads, as ``tools/bench/bounded_cpu.py``);
bounded: W = 256, S = 4, C = 64, R = 4. The bounded step takes one token per call, so its prompt is fed token by
token; the original's prompt goes in one call. Decode time: the median of 16 steps after the prompt.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

import mka_compile
from mka_compile import MKAConfig
from mka_compile.export import OnnxDecoder, export_onnx


def decode_ms(path: Path, n: int, steps: int = 16, one_token: bool = False) -> float:
    dec = OnnxDecoder(path, intra_op_num_threads=1)
    ids = np.random.default_rng(0).integers(0, 256, (1, n + steps))
    if one_token:
        for i in range(n):
            dec(ids[:, i : i + 1])
    else:
        dec(ids[:, :n])
    times = []
    for i in range(n, n + steps):
        t = time.perf_counter()
        dec(ids[:, i : i + 1])
        times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--max-lens", type=int, nargs="+", default=[4096, 32768])
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=1024,
    )  # fmt: skip
    original = transformers.LlamaForCausalLM(cfg).eval()
    bounded = copy.deepcopy(original)
    mka_compile.convert(bounded, config=MKAConfig(window=256, sink_tokens=4, chunk_size=64, recall_chunks=4, top_r=4))
    example = torch.randint(0, 256, (2, 8))
    rows = []
    with tempfile.TemporaryDirectory() as d:
        top = max(args.max_lens)
        full = export_onnx(original, example, Path(d) / "original.onnx", decode_step=True, max_len=top)
        for n in args.contexts:
            rows.append(("original (past K/V grow)", top, n, decode_ms(full, n)))
            print(rows[-1], flush=True)
        for max_len in args.max_lens:
            path = export_onnx(bounded, example, Path(d) / f"bounded_{max_len}.onnx", decode_step=True, max_len=max_len)
            for n in args.contexts:
                if n + 16 <= max_len:
                    rows.append(("bounded (fixed-size step)", max_len, n, decode_ms(path, n, one_token=True)))
                    print(rows[-1], flush=True)
    print("\n| step | max_len | context | decode ms/token |\n|---|---|---|---|")
    for name, max_len, n, ms in rows:
        print(f"| {name} | {max_len} | {n} | {ms:.2f} |")


if __name__ == "__main__":
    main()
