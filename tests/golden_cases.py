"""Golden cases for the detection rules: a model, its inputs, and the rendered report."""

from __future__ import annotations

import torch
import zoo

import mka_compile


def _hf(family: str, attn: str):
    model, _ = zoo.causal_lm(family, attn)
    return model, {"input_ids": torch.arange(16).view(2, 8) % 90, "use_cache": False}


CASES = {
    "llama_eager": lambda: _hf("llama", "eager"),
    "llama_sdpa": lambda: _hf("llama", "sdpa"),
    "gpt2_eager": lambda: _hf("gpt2", "eager"),
    "falcon_sdpa": lambda: _hf("falcon", "sdpa"),
    "nanogpt_manual": lambda: (zoo.NanoGPT(flash=False), (torch.arange(16).view(2, 8),)),
    "lookalikes": lambda: (_LookAlikes(), (torch.ones(2, 6, 16),)),
}


class _LookAlikes(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router, self.pool, self.cls = zoo.MoERouter(), zoo.AttentionPooling(), zoo.ClassifierHead()

    def forward(self, x):
        return self.router(x).sum() + self.pool(x).sum() + self.cls(x).sum()


def render(name: str) -> str:
    torch.manual_seed(0)
    model, inputs = CASES[name]()
    return str(mka_compile.inspect(model.eval(), inputs))
