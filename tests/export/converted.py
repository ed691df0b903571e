"""Converted tiny Hugging Face models with random MKA parameters (the rewrite is live), for the export tests."""

from __future__ import annotations

import torch
import zoo

import mka_compile
from mka_compile import MKAConfig

CFG = MKAConfig(gate_init=0.0, chunk_size=4, top_r=2)  # chunks of 4: the long-term level is exercised
MAX_LEN = 64  # zoo models: max_position_embeddings = 64 -> 16 summary slots


def converted(family: str, mode: str, probe: torch.Tensor | None = None):
    """``(model, original logits on probe)``: the model converted, every new parameter random, gate 1."""
    model, _ = zoo.causal_lm(family, "sdpa")
    base = None
    if probe is not None:
        with torch.no_grad():
            base = model(probe).logits
    mka_compile.convert(model, mode=mode, config=CFG)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mka." in name:
                p.fill_(1.0) if name.endswith("gate") else p.normal_(0, 0.5)
    return model, base


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max())
