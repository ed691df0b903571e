"""Builders of the third-party-style models for tests and ``tools/support/table.py``.

``build(name) -> (model, input_ids, spec)``: ``spec["example"]`` are the example inputs for ``inspect`` /
``convert`` (a cached call at ``input_pos``), ``spec["decode"](model, ids)`` the logits of the last tokens from a
prefill then one cached call per token (compared with a full forward without ``input_pos``).
"""

from __future__ import annotations

import torch

DECODE_STEPS = 3


def _decode(model, ids: torch.Tensor) -> torch.Tensor:
    T = ids.shape[1]
    n = T - DECODE_STEPS
    with torch.no_grad():
        model(ids[:, :n], input_pos=torch.arange(n))
        steps = [model(ids[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(n, T)]
    return torch.cat(steps, 1)


def build(name: str):
    torch.manual_seed(0)
    if name in ("litgpt", "litgpt_softcap"):
        from thirdparty.litgpt_style import GPT, Config

        model = GPT(Config(attention_logit_softcapping=30.0 if name == "litgpt_softcap" else None)).eval()
        model.set_kv_cache(batch_size=1)
    elif name == "torchtune":
        from thirdparty.torchtune_style import TransformerDecoder

        model = TransformerDecoder().eval()
        model.setup_caches(batch_size=1)
    else:
        raise KeyError(f"unknown third-party model {name!r}")
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    spec = {
        "example": {"idx" if name.startswith("litgpt") else "tokens": ids, "input_pos": torch.arange(8)},
        "decode": _decode,
    }
    spec["forward_kwargs"] = {"input_pos": torch.arange(ids.shape[1])}  # the full forward: one cached call from 0
    return model, ids, spec


NAMES = ("litgpt", "litgpt_softcap", "torchtune")
