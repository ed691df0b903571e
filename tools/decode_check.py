"""Build a tiny decoder LM on MKA layers, run prefill + token-by-token decode, check it equals one forward.

This is the project's main job until the ``mka-compile`` CLI exists::

    python tools/decode_check.py                 # both modes, bundled defaults
    python tools/decode_check.py --mode mka --tokens 300 --prefill 40

It prints one row per mode: the largest difference between decoding (prefill, then one token at a time,
with the KV cache carrying the session EMA and long-term chunk state) and a single full forward, relative
to the output's magnitude, and whether it is within the tolerance (1e-5, fp32). Random router weights make
every memory level contribute.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from mka_compile import FastMKAAttention, MKAAttention, MKACache, MKAConfig


class TinyLM(nn.Module):
    """Embedding, ``layers`` pre-norm blocks (MKA attention + SiLU MLP), tied output head."""

    def __init__(self, mode: str, vocab: int, hidden: int, heads: int, kv_heads: int, layers: int, cfg: MKAConfig):
        super().__init__()
        attn = {"fastmka": FastMKAAttention, "mka": MKAAttention}[mode]
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList()
        for i in range(layers):
            block = nn.ModuleDict(
                {
                    "norm1": nn.RMSNorm(hidden),
                    "attn": attn(hidden, heads, kv_heads, config=cfg, layer_idx=i),
                    "norm2": nn.RMSNorm(hidden),
                    "mlp": nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.SiLU(), nn.Linear(4 * hidden, hidden)),
                }
            )
            self.blocks.append(block)
        self.norm = nn.RMSNorm(hidden)

    def forward(self, ids: torch.Tensor, cache: MKACache | None = None) -> torch.Tensor:
        """``ids: [B, T]`` -> logits ``[B, T, vocab]``."""
        h = self.embed(ids)
        for blk in self.blocks:
            h = h + blk["attn"](blk["norm1"](h), cache=cache)
            h = h + blk["mlp"](blk["norm2"](h))
        return self.norm(h) @ self.embed.weight.T


def check_mode(mode: str, args: argparse.Namespace) -> dict[str, object]:
    torch.manual_seed(args.seed)
    cfg = MKAConfig(chunk_size=args.chunk_size, top_r=args.top_r)
    model = TinyLM(mode, args.vocab, args.hidden, args.heads, args.kv_heads, args.layers, cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name:
                p.normal_(0, 0.5)  # random routing: every level contributes
    ids = torch.randint(0, args.vocab, (args.batch, args.tokens))
    with torch.no_grad():
        model(ids[:, :8])  # warm-up: first-call costs (op registration, allocator) stay out of the timings
    t0 = time.perf_counter()
    with torch.no_grad():
        full = model(ids)
        t1 = time.perf_counter()
        cache = MKACache()
        steps = [model(ids[:, : args.prefill], cache=cache)]
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(args.prefill, args.tokens)]
        t2 = time.perf_counter()
    dec = torch.cat(steps, 1)
    rel = float((dec - full).abs().max() / full.abs().max())
    return {
        "mode": mode,
        "tokens": args.tokens,
        "rel": rel,
        "ok": rel <= args.tol,
        "forward_s": t1 - t0,
        "decode_ms_per_token": 1e3 * (t2 - t1) / max(1, args.tokens - args.prefill),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=["fastmka", "mka", "both"], default="both")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--prefill", type=int, default=37)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--top-r", type=int, default=4)
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 0 < args.prefill < args.tokens:
        p.error("--prefill must lie between 0 and --tokens")
    modes = ["fastmka", "mka"] if args.mode == "both" else [args.mode]
    rows = [check_mode(m, args) for m in modes]
    table = Table(title="MKA decode consistency: prefill + token-by-token decode vs one full forward (fp32)")
    for col in ("mode", "tokens", "max |decode - full| / max |full|", "within 1e-5", "forward s", "decode ms/token"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r["mode"]),
            str(r["tokens"]),
            f"{r['rel']:.2e}",
            "yes" if r["ok"] else "NO",
            f"{r['forward_s']:.3f}",
            f"{r['decode_ms_per_token']:.2f}",
        )
    Console().print(table)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
