"""Same-run timing ratios of converted models and MKA layers against their unconverted baselines (CPU or GPU).

Every comparison times its candidates interleaved in one run (median of ``repeats``, the order rotated each
round), because shared machines are noisy: the ratios are what to read, not the absolute milliseconds.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mka_compile.config import MKAConfig


def interleaved(cands: dict[str, Callable[[], Any]], repeats: int, sync: Callable[[], None] = lambda: None):
    """Median milliseconds per candidate, measured round-robin with the order rotated every round."""
    for f in cands.values():  # warm-up
        f()
    times: dict[str, list[float]] = {k: [] for k in cands}
    names = list(cands)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            t0 = time.perf_counter()
            cands[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def randomize_mka(model: nn.Module, seed: int = 0) -> nn.Module:
    """Write random values into every new MKA parameter (gate 1) so each memory level contributes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mka." in name:
                p.copy_(torch.ones_like(p) if name.endswith("gate") else 0.3 * torch.randn(p.shape, generator=g))
    return model


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def _scalar(out: Any) -> torch.Tensor:
    loss = getattr(out, "loss", None)
    if loss is not None:
        return loss
    t = getattr(out, "logits", out)
    if isinstance(t, (tuple, list)):
        t = t[0]
    return t.float().square().mean()


def model_ratios(
    model: nn.Module,
    inputs: Any,
    *,
    modes: tuple[str, ...] = ("fastmka", "mka"),
    config: MKAConfig | None = None,
    example_inputs: Any = None,
    backward: bool = True,
    repeats: int = 7,
) -> list[dict]:
    """Forward (and forward+backward) of ``model`` and of converted copies, side by side.

    ``inputs``: positional-argument tuple or keyword dict of one call (for Hugging Face causal LMs include
    ``labels`` to time the real loss). Returns rows ``{"what", "ms", "ratio"}`` (ratio to the original);
    a mode that cannot convert this model gets a row with ``"error"`` instead.
    """
    from mka_compile.conversion import ConversionError, convert

    models = {"original": model}
    rows_err = []
    for mode in modes:
        try:
            conv = convert(copy.deepcopy(model), mode=mode, config=config, example_inputs=example_inputs)
        except ConversionError as e:
            rows_err.append({"what": f"{mode} (not converted)", "error": str(e).splitlines()[0]})
            continue
        models[mode] = randomize_mka(conv)

    def fwd(m):
        with torch.no_grad():
            _call(m, inputs)

    def fwd_bwd(m):
        _scalar(_call(m, inputs)).backward()
        m.zero_grad(set_to_none=True)

    cands = {f"{k} fwd": (lambda m=m: fwd(m)) for k, m in models.items()}
    if backward:
        cands |= {f"{k} fwd+bwd": (lambda m=m: fwd_bwd(m)) for k, m in models.items()}
    sync = torch.cuda.synchronize if any(p.is_cuda for p in model.parameters()) else (lambda: None)
    for m in models.values():
        m.eval()  # no dropout: the timings compare the same arithmetic
    med = interleaved(cands, repeats, sync)
    rows = []
    for what, ms in med.items():
        base = med["original fwd+bwd" if what.endswith("+bwd") else "original fwd"]
        rows.append({"what": what, "ms": ms, "ratio": ms / base})
    return rows + rows_err


class SDPAAttention(nn.Module):
    """The baseline layer: plain causal attention of the same size (q/k/v projections, GQA through PyTorch SDPA,
    o_proj; no RoPE, no memory levels)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        gqa = self.num_heads != self.num_kv_heads
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def layer_ratios(
    hidden: int = 256,
    heads: int = 8,
    kv_heads: int = 4,
    tokens: int = 1024,
    batch: int = 1,
    config: MKAConfig | None = None,
    repeats: int = 7,
    device: str = "cpu",
) -> list[dict]:
    """One attention layer: FastMKA and MKA (all levels, gate 1) against a plain SDPA layer, forward."""
    from mka_compile.layers import FastMKAAttention, MKAAttention

    torch.manual_seed(0)
    cfg = config or MKAConfig()
    layers = {
        "SDPA layer": SDPAAttention(hidden, heads, kv_heads),
        "FastMKA layer": FastMKAAttention(hidden, heads, kv_heads, config=cfg),
        "MKA layer": MKAAttention(hidden, heads, kv_heads, config=cfg),
    }
    x = torch.randn(batch, tokens, hidden, device=device)
    cands = {}
    for name, layer in layers.items():
        layer.to(device).eval()

        def run(layer=layer):
            with torch.no_grad():
                layer(x)

        cands[name] = run
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    med = interleaved(cands, repeats, sync)
    return [{"what": k, "ms": v, "ratio": v / med["SDPA layer"]} for k, v in med.items()]
