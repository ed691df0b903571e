"""What training and statistics read off a converted model's sites: the parameters conversion added, and the mean
routing weight of each memory level."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mka_compile.sites.memory import SiteMemory


def memory_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters conversion added (every site's router and gate). Adapter libraries freeze what they did not
    add: after ``peft.get_peft_model(converted, ...)``, ``for p in memory_parameters(model): p.requires_grad_(True)``
    trains them beside the adapters."""
    return [p for m in model.modules() if isinstance(m, SiteMemory) for p in m.parameters()]


@torch.no_grad()
def routing_stats(model: nn.Module, batches: list[Any]) -> dict[str, dict[str, float]]:
    """Mean routing weight of each memory level at each converted site over ``batches`` (real tokens only).

    ``batches``: inputs for ``model`` (a tensor, a tuple of positional arguments, or a dict of keyword
    arguments). Returns ``{site: {level: mean lambda}}``; right after conversion every site is
    ``{"local": 1.0, ...: 0.0}``, and training moves it."""
    sites = {name.removesuffix(".mka"): m for name, m in model.named_modules() if isinstance(m, SiteMemory)}
    if not sites:
        raise ValueError("the model has no converted site; call mka_compile.convert(model) first")
    for m in sites.values():
        m._stats = []
    try:
        for b in batches:
            model(**b) if isinstance(b, dict) else model(*b) if isinstance(b, (tuple, list)) else model(b)
        out = {}
        for name, m in sites.items():
            total = sum(t for t, _ in m._stats)
            count = sum(c for _, c in m._stats)
            out[name] = {lv: float(total[i] / max(count, 1.0)) for i, lv in enumerate(m.config.levels)}
        return out
    finally:
        for m in sites.values():
            m._stats = None
