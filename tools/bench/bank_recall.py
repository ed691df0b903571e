"""The recall step against a large memory bank: scoring every bank chunk (``mka::recall_select``) against the FAISS
indexes of ``MemoryBank.with_index`` (build time, search time, and how often they choose the same top R).

    python tools/bench/bank_recall.py

One thread; random recall keys (the worst case for approximate search: nothing clusters).
"""

from __future__ import annotations

import time

import torch

from mka_compile.bounded_bank import BankLayer, MemoryBank


def main() -> None:
    import faiss

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    G, d, C, R = 2, 64, 32, 4
    w = d + d // 2  # centre, then one radius per RoPE pair
    for M in (10_000, 100_000):
        bounds = torch.randn(G, M, w)
        tokens = torch.zeros(G, 1, C, d).expand(G, M, C, d)  # the tokens play no part in the recall
        bank = MemoryBank(C, {0: BankLayer(tokens, tokens, torch.arange(M) * C, bounds)})
        for T in (1, 256):
            q = torch.randn(1, G, T, w)
            at = torch.zeros(1, T, dtype=torch.int64)
            t0 = time.perf_counter()
            sel, _ = torch.ops.mka.recall_select(q, torch.zeros(1, G, 0, w), at, C, R, bounds[None], None)
            t_all = time.perf_counter() - t0
            cells = []
            for kind in ("flat", "ivf", "hnsw"):
                t0 = time.perf_counter()
                layer = bank.with_index(kind, nprobe=8).layers[0]
                built = time.perf_counter() - t0
                t0 = time.perf_counter()
                _, ids = layer.search(q[0], R)
                searched = time.perf_counter() - t0
                same = (ids.sort(-1).values == sel[0].sort(-1).values).all(-1).float().mean().item()
                cells.append(
                    f"{kind}: build {built:.2f} s, search {1e3 * searched:.1f} ms, same top-{R} {100 * same:.0f} %"
                )
            print(f"M={M:>7} T={T:>4}: every chunk {1e3 * t_all:7.1f} ms | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
